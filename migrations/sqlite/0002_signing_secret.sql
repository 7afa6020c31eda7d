-- A zap may require Standard Webhooks signatures on its deliveries. The
-- secret is kept as given (whsec_...): verifying an HMAC needs the key itself.
ALTER TABLE zaps ADD COLUMN signing_secret TEXT;
