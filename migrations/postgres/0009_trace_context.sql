-- The W3C trace context (traceparent) of the work that wrote an outbox
-- row, so that whatever takes the row continues the run's trace. NULL when
-- tracing is off.
ALTER TABLE zap_run_outbox ADD COLUMN trace_parent text;
