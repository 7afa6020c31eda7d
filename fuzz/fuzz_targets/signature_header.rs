//! Arbitrary Standard Webhooks headers, bodies and secrets: verification
//! never panics, a secret's text form round-trips, and a valid signature
//! among any amount of junk in the header always passes.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use zapflow_core::webhook_signature::{Secret, SignatureHeaders, sign, verify};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    secret_text: &'a str,
    key: [u8; 32],
    id: Option<&'a str>,
    timestamp: Option<&'a str>,
    signature: Option<&'a str>,
    body: &'a [u8],
    now: i64,
}

fuzz_target!(|input: Input<'_>| {
    let key = Secret::from_bytes(input.key.to_vec()).expect("32 bytes is long enough");
    let mut secrets = vec![key.clone()];
    if let Ok(parsed) = Secret::parse(input.secret_text) {
        let text = parsed.expose();
        let reparsed = Secret::parse(&text).expect("an exposed secret parses");
        assert_eq!(reparsed.expose(), text);
        secrets.push(parsed);
    }

    let headers = SignatureHeaders {
        id: input.id,
        timestamp: input.timestamp,
        signature: input.signature,
    };
    let _ = verify(&secrets, headers, input.body, input.now);

    // Verification trims header values, so only an id that is already
    // trimmed is signed as sent.
    let Some(id) = input.id.filter(|id| !id.is_empty() && *id == id.trim()) else {
        return;
    };
    let now = input.now.max(0);
    let timestamp = now.to_string();
    let valid = sign(&key, id, now, input.body);
    let signature = format!("{} {valid}", input.signature.unwrap_or_default());
    let headers = SignatureHeaders {
        id: Some(id),
        timestamp: Some(&timestamp),
        signature: Some(&signature),
    };
    assert_eq!(verify(&secrets, headers, input.body, now), Ok(()));
});
