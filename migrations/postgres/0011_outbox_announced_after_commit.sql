-- Writers announce new outbox rows themselves, after their commit (see
-- wakeups.rs): a NOTIFY inside the writing transaction holds the database's
-- notification lock through the commit, so that every writer that announces
-- commits one at a time.
DROP TRIGGER zap_run_outbox_notify ON zap_run_outbox;
DROP FUNCTION zap_run_outbox_notify();
