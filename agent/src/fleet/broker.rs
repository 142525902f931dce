//! The operator's broker connection: URL, TLS (rustls on ring), credentials.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, MqttOptions, TlsConfiguration, Transport};

use super::FleetError;

/// The largest message the CLI sends or takes (a pushed model package).
pub const MAX_PACKET_BYTES: usize = crate::sync::envelope::MAX_ENVELOPE_BYTES + 4096;

/// How to reach the broker.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    pub url: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// `mqtt://host[:port]` or `mqtts://host[:port]` into (tls, host, port).
pub fn parse_url(url: &str) -> Result<(bool, String, u16), FleetError> {
    let bad = |what: &str| FleetError::Args(format!("--broker {url:?}: {what}"));
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(bad("expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('@') || rest.contains('?') {
        return Err(bad(
            "only a host and a port (credentials go in --username and --password-file)",
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in the host"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
            None if after.is_empty() => default_port,
            None => return Err(bad("junk after the host")),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse().map_err(|_| bad("the port is not a number"))?,
            ),
            None => (rest.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((tls, host, port))
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, FleetError> {
    std::fs::read(path).map_err(|e| FleetError::Args(format!("{what} {}: {e}", path.display())))
}

/// The rustls client config: the CA file's roots (or none: a CA file is
/// required for mqtts), an optional client certificate, the ring provider.
fn tls_config(o: &BrokerOptions) -> Result<rustls::ClientConfig, FleetError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca = o
        .ca_file
        .as_ref()
        .ok_or_else(|| FleetError::Args("mqtts:// needs --ca-file".into()))?;
    let mut roots = rustls::RootCertStore::empty();
    let pem = read_file(ca, "--ca-file")?;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert =
            cert.map_err(|e| FleetError::Args(format!("--ca-file {}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| FleetError::Args(format!("--ca-file {}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(FleetError::Args(format!(
            "--ca-file {}: no certificate in it",
            ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| FleetError::Args(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    match (&o.cert_file, &o.key_file) {
        (Some(c), Some(k)) => {
            let pem = read_file(c, "--cert-file")?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| FleetError::Args(format!("--cert-file {}: {e}", c.display())))?;
            let key_pem = read_file(k, "--key-file")?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| FleetError::Args(format!("--key-file {}: {e}", k.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| FleetError::Args(format!("client certificate: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(FleetError::Args(
            "--cert-file and --key-file go together".into(),
        )),
    }
}

/// A client with a fresh random id; the event loop must be polled.
pub fn connect(o: &BrokerOptions) -> Result<(AsyncClient, EventLoop), FleetError> {
    use rand_core::RngCore as _;
    let (tls, host, port) = parse_url(&o.url)?;
    let id = format!("outpost-fleet-{:016x}", rand_core::OsRng.next_u64());
    let mut opts = MqttOptions::new(id, host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    opts.set_request_channel_capacity(64);
    if let Some(user) = &o.username {
        let password = match &o.password_file {
            Some(p) => String::from_utf8(read_file(p, "--password-file")?)
                .map_err(|_| FleetError::Args("--password-file is not UTF-8".into()))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            None => String::new(),
        };
        opts.set_credentials(user.clone(), password);
    } else if o.password_file.is_some() {
        return Err(FleetError::Args("--password-file needs --username".into()));
    }
    if tls {
        let cfg = tls_config(o)?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(cfg),
        )));
    } else if o.ca_file.is_some() || o.cert_file.is_some() {
        return Err(FleetError::Args(
            "--ca-file/--cert-file need an mqtts:// broker".into(),
        ));
    }
    Ok(AsyncClient::new(opts, 64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_default_ports() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1").unwrap(),
            (false, "127.0.0.1".into(), 1883)
        );
        assert_eq!(
            parse_url("mqtts://fleet.example.net").unwrap(),
            (true, "fleet.example.net".into(), 8883)
        );
        assert_eq!(
            parse_url("mqtt://[::1]:1884").unwrap(),
            (false, "::1".into(), 1884)
        );
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://h:port",
            "mqtt://u:p@h",
            "mqtt://h/x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_needs_a_ca_and_plain_refuses_tls_files() {
        let o = BrokerOptions {
            url: "mqtts://h".into(),
            ..BrokerOptions::default()
        };
        assert!(matches!(connect(&o), Err(FleetError::Args(m)) if m.contains("--ca-file")));
        let o = BrokerOptions {
            url: "mqtt://h".into(),
            ca_file: Some("/nonexistent".into()),
            ..BrokerOptions::default()
        };
        assert!(matches!(connect(&o), Err(FleetError::Args(_))));
    }
}
