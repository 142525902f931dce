//! An MQTT command payload, as the uplink hands it to the command handler:
//! the signed envelope (`sync::envelope::open`: size, version, base64, key,
//! signature) and the command JSON in it (`sync::command::Command`). Only
//! the pure steps: the handler's argument checks (`admit`, `parse_action`)
//! are private to `sync::command`, and what follows them acts on the host.
#![no_main]

use std::sync::OnceLock;

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use outpost::sync::command::{self, Command};
use outpost::sync::envelope;

/// The key the seeds are signed with (seeds/make_command_seeds.py).
const SEED_KEY: [u8; 32] = [7; 32];

fn trusted() -> &'static [String] {
    static T: OnceLock<Vec<String>> = OnceLock::new();
    T.get_or_init(|| {
        vec![envelope::key_line(
            &SigningKey::from_bytes(&SEED_KEY).verifying_key(),
        )]
    })
}

fn body(bytes: &[u8]) {
    let Ok(c) = serde_json::from_slice::<Command>(bytes) else {
        return;
    };
    let _ = command::stagger(
        &c.id,
        c.group_size.unwrap_or(0),
        c.max_concurrency.unwrap_or(0),
        c.slot_ms.unwrap_or(0),
    );
}

fuzz_target!(|data: &[u8]| {
    // A node with [fleet] trusted_keys: only the seed key's signature opens.
    let _ = envelope::open(data, trusted());
    // A node without: unsigned envelopes open, signed ones are verified.
    if let Ok(opened) = envelope::open(data, &[]) {
        body(&opened.body);
    }
    // The command JSON on its own, as if a trusted key had signed it.
    body(data);
    // A `trusted_keys` line as the config holds it.
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = envelope::parse_key(s);
    }
});
