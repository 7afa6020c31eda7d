-- Announce every changed or deleted zap, so that processes keeping zaps in
-- memory for webhooks (zap_cache.rs) drop what they hold of it.
CREATE FUNCTION zaps_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('zapflow_zaps', OLD.id::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER zaps_notify
    AFTER UPDATE OR DELETE ON zaps
    FOR EACH ROW EXECUTE FUNCTION zaps_notify();
