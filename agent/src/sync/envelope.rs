//! Signed command envelopes: `{"v":1,"body":B64,"key":"ed25519:B64","sig":B64}`
//! where `sig` is ed25519 over the exact body bytes.
//!
//! [`open`] checks the size before it parses anything, then the version,
//! the base64 fields and the signature. Which signers are trusted is the
//! caller's list (`[fleet] trusted_keys`): with keys configured, only a valid
//! signature by one of them opens the envelope; with none configured, an
//! unsigned envelope opens with no signer (the command layer decides what an
//! unsigned command may do) and a signed one must still carry a valid
//! signature. [`sign`] and the key-file helpers are the operator's side.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// The envelope schema version.
pub const ENVELOPE_VERSION: u32 = 1;
/// The largest envelope a node reads, checked before parsing. A model
/// package travels base64'd twice (in the command, and the command in the
/// envelope), so this bounds a pushed package at about 8 MiB of tar.
pub const MAX_ENVELOPE_BYTES: usize = 16 << 20;
/// How a public key is written in `trusted_keys` and in envelopes.
pub const KEY_PREFIX: &str = "ed25519:";
/// The first line of a private key file written by `outpost fleet keygen`.
pub const SECRET_PREFIX: &str = "outpost-ed25519-secret:";

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("payload is {size} bytes, over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("not a command envelope: {0}")]
    Garbled(String),
    #[error("envelope version {0} is not supported (this node takes v{ENVELOPE_VERSION})")]
    Version(u32),
    #[error("envelope field {field}: not valid base64")]
    Base64 { field: &'static str },
    #[error("bad public key {key:?}: {what}")]
    BadKey { key: String, what: String },
    #[error("unsigned command refused: this node only takes commands signed by a trusted key")]
    Unsigned,
    #[error("key {0} is not in [fleet] trusted_keys")]
    Untrusted(String),
    #[error("bad signature: the body was not signed by {0}")]
    BadSignature(String),
    #[error("key file {path}: {what}")]
    KeyFile { path: PathBuf, what: String },
}

/// The wire form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub v: u32,
    /// Base64 of the command JSON bytes.
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

impl Envelope {
    /// An unsigned envelope (accepted only by nodes that allow it).
    pub fn unsigned(body: &[u8]) -> Envelope {
        Envelope {
            v: ENVELOPE_VERSION,
            body: B64.encode(body),
            key: None,
            sig: None,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// An opened envelope: the exact body bytes and who signed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub body: Vec<u8>,
    /// `ed25519:BASE64` of a valid signer, `None` for an unsigned envelope.
    pub signer: Option<String>,
}

/// Writes a public key as `trusted_keys` lists it.
pub fn key_line(key: &VerifyingKey) -> String {
    format!("{KEY_PREFIX}{}", B64.encode(key.as_bytes()))
}

/// Reads an `ed25519:BASE64` public key.
pub fn parse_key(s: &str) -> Result<VerifyingKey, EnvelopeError> {
    let bad = |what: &str| EnvelopeError::BadKey {
        key: s.chars().take(80).collect(),
        what: what.to_string(),
    };
    let b64 = s
        .trim()
        .strip_prefix(KEY_PREFIX)
        .ok_or_else(|| bad("expected ed25519:BASE64"))?;
    let bytes = B64.decode(b64).map_err(|_| bad("not valid base64"))?;
    let arr: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| bad("an ed25519 public key is 32 bytes"))?;
    VerifyingKey::from_bytes(&arr).map_err(|_| bad("not a valid ed25519 point"))
}

/// Signs `body` into an envelope.
pub fn sign(body: &[u8], key: &SigningKey) -> Envelope {
    let sig = key.sign(body);
    Envelope {
        v: ENVELOPE_VERSION,
        body: B64.encode(body),
        key: Some(key_line(&key.verifying_key())),
        sig: Some(B64.encode(sig.to_bytes())),
    }
}

/// Checks and opens an envelope against `trusted` (`ed25519:BASE64`
/// lines; an unparsable line trusts nobody, and config validation should
/// have refused it).
pub fn open(payload: &[u8], trusted: &[String]) -> Result<Opened, EnvelopeError> {
    if payload.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge {
            size: payload.len(),
            max: MAX_ENVELOPE_BYTES,
        });
    }
    let env: Envelope =
        serde_json::from_slice(payload).map_err(|e| EnvelopeError::Garbled(e.to_string()))?;
    if env.v != ENVELOPE_VERSION {
        return Err(EnvelopeError::Version(env.v));
    }
    let body = B64
        .decode(env.body.as_bytes())
        .map_err(|_| EnvelopeError::Base64 { field: "body" })?;
    let (key_s, sig_s) = match (env.key, env.sig) {
        (None, None) => {
            if trusted.is_empty() {
                return Ok(Opened { body, signer: None });
            }
            return Err(EnvelopeError::Unsigned);
        }
        (Some(k), Some(s)) => (k, s),
        _ => {
            return Err(EnvelopeError::Garbled(
                "`key` and `sig` come together or not at all".into(),
            ))
        }
    };
    let key = parse_key(&key_s)?;
    if !trusted.is_empty()
        && !trusted
            .iter()
            .filter_map(|t| parse_key(t).ok())
            .any(|t| t == key)
    {
        return Err(EnvelopeError::Untrusted(key_line(&key)));
    }
    let sig_bytes = B64
        .decode(sig_s.as_bytes())
        .map_err(|_| EnvelopeError::Base64 { field: "sig" })?;
    let sig_arr: [u8; 64] = sig_bytes
        .as_slice()
        .try_into()
        .map_err(|_| EnvelopeError::BadSignature(key_line(&key)))?;
    let sig = Signature::from_bytes(&sig_arr);
    key.verify_strict(&body, &sig)
        .map_err(|_| EnvelopeError::BadSignature(key_line(&key)))?;
    Ok(Opened {
        body,
        signer: Some(key_line(&key)),
    })
}

/// A new random signing key.
pub fn generate() -> SigningKey {
    SigningKey::generate(&mut rand_core::OsRng)
}

/// Writes a private key file (mode 0600; an existing file is never
/// overwritten) and returns the public key line for `trusted_keys`.
pub fn write_key_file(path: &Path, key: &SigningKey) -> Result<String, EnvelopeError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |what: String| EnvelopeError::KeyFile {
        path: path.to_path_buf(),
        what,
    };
    let public = key_line(&key.verifying_key());
    let text = format!(
        "{SECRET_PREFIX}{}\n# public: {public}\n",
        B64.encode(key.to_bytes())
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| err(e.to_string()))?;
    Ok(public)
}

/// Reads a private key file written by [`write_key_file`].
pub fn read_key_file(path: &Path) -> Result<SigningKey, EnvelopeError> {
    let err = |what: String| EnvelopeError::KeyFile {
        path: path.to_path_buf(),
        what,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > 4096 {
        return Err(err("too large for a key file".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(SECRET_PREFIX))
        .ok_or_else(|| err(format!("no `{SECRET_PREFIX}` line")))?;
    let bytes = B64
        .decode(line.trim())
        .map_err(|_| err("the secret is not valid base64".into()))?;
    let arr: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| err("an ed25519 secret key is 32 bytes".into()))?;
    Ok(SigningKey::from_bytes(&arr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_signed_envelope_opens_with_its_exact_body_and_signer() {
        let k = key(1);
        let body = br#"{"id":"a","cmd":"status"}"#;
        let env = sign(body, &k).to_json();
        let opened = open(&env, &[key_line(&k.verifying_key())]).unwrap();
        assert_eq!(opened.body, body);
        assert_eq!(opened.signer, Some(key_line(&k.verifying_key())));
    }

    #[test]
    fn with_trusted_keys_an_unsigned_envelope_is_refused() {
        let env = Envelope::unsigned(b"{}").to_json();
        let err = open(&env, &[key_line(&key(1).verifying_key())]).unwrap_err();
        assert!(matches!(err, EnvelopeError::Unsigned), "{err}");
    }

    #[test]
    fn without_trusted_keys_an_unsigned_envelope_opens_with_no_signer() {
        let env = Envelope::unsigned(b"{\"x\":1}").to_json();
        let opened = open(&env, &[]).unwrap();
        assert_eq!(opened.signer, None);
        assert_eq!(opened.body, b"{\"x\":1}");
    }

    #[test]
    fn a_key_not_in_the_trusted_list_is_refused() {
        let env = sign(b"{}", &key(2)).to_json();
        let err = open(&env, &[key_line(&key(1).verifying_key())]).unwrap_err();
        assert!(matches!(err, EnvelopeError::Untrusted(_)), "{err}");
    }

    #[test]
    fn a_changed_body_fails_the_signature() {
        let k = key(1);
        let mut env = sign(b"{\"cmd\":\"pause\"}", &k);
        env.body = B64.encode(b"{\"cmd\":\"resume\"}");
        let err = open(&env.to_json(), &[key_line(&k.verifying_key())]).unwrap_err();
        assert!(matches!(err, EnvelopeError::BadSignature(_)), "{err}");
        // Even on a node that trusts nobody in particular.
        let err = open(&env.to_json(), &[]).unwrap_err();
        assert!(matches!(err, EnvelopeError::BadSignature(_)), "{err}");
    }

    #[test]
    fn a_truncated_signature_is_a_bad_signature() {
        let k = key(1);
        let mut env = sign(b"{}", &k);
        env.sig = Some(B64.encode([0u8; 10]));
        let err = open(&env.to_json(), &[key_line(&k.verifying_key())]).unwrap_err();
        assert!(matches!(err, EnvelopeError::BadSignature(_)), "{err}");
    }

    #[test]
    fn garbled_and_oversized_payloads_are_refused_before_anything_else() {
        assert!(matches!(
            open(b"not json", &[]),
            Err(EnvelopeError::Garbled(_))
        ));
        assert!(matches!(
            open(br#"{"v":1,"body":"!!"}"#, &[]),
            Err(EnvelopeError::Base64 { field: "body" })
        ));
        assert!(matches!(
            open(br#"{"v":2,"body":""}"#, &[]),
            Err(EnvelopeError::Version(2))
        ));
        assert!(matches!(
            open(br#"{"v":1,"body":"","key":"ed25519:AAAA"}"#, &[]),
            Err(EnvelopeError::Garbled(_))
        ));
        let big = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(
            open(&big, &[]),
            Err(EnvelopeError::TooLarge { .. })
        ));
    }

    #[test]
    fn key_lines_round_trip_and_bad_ones_are_refused() {
        let k = key(7).verifying_key();
        assert_eq!(parse_key(&key_line(&k)).unwrap(), k);
        assert!(parse_key("ed25519:AAAA").is_err());
        assert!(parse_key("rsa:AAAA").is_err());
    }

    #[test]
    fn key_files_are_private_round_trip_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.key");
        let k = generate();
        let public = write_key_file(&path, &k).unwrap();
        assert_eq!(public, key_line(&k.verifying_key()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_key_file(&path).unwrap().to_bytes(), k.to_bytes());
        assert!(write_key_file(&path, &generate()).is_err());
        assert_eq!(read_key_file(&path).unwrap().to_bytes(), k.to_bytes());
    }
}
