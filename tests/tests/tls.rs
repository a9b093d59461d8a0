//! TLS termination: SNI picks the certificate, unknown names are refused, certificates rotate
//! without dropping open connections, and bad certificate files are refused with their path.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meridian_gateway::tls::{load_certified_key, CertTable, TlsError};
use meridian_testkit::devcerts::DevCa;
use meridian_tests::secure::{tcp_client_config, tls_connect};
use meridian_tests::{local_config, source_for, World};

/// The leaf certificate (DER) the edge presents for `sni`, or the handshake error.
fn presented(
    world: &World,
    sni: &str,
    versions: Option<&'static rustls::SupportedProtocolVersion>,
) -> Result<Vec<u8>, String> {
    let tls = world.tls.as_ref().expect("tls");
    let mut config = tcp_client_config(tls.roots(), &[b"http/1.1"]);
    if let Some(version) = versions {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .expect("version")
            .with_root_certificates(tls.roots())
            .with_no_client_auth();
    }
    let target = world.edge.https_addr.expect("https");
    world.runtime.block_on(async {
        let stream = tls_connect(source_for("US"), target, sni, config)
            .await
            .map_err(|e| e.to_string())?;
        let (_, session) = stream.get_ref();
        Ok(session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
            .unwrap_or_default())
    })
}

fn file_der(path: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path)
        .expect("cert file")
        .as_ref()
        .to_vec()
}

#[test]
fn sni_selects_exact_and_wildcard_certificates_and_refuses_unknown_names() {
    let world = World::start(local_config());
    let dir = &world.tls.as_ref().expect("tls").dir;
    let api = file_der(&dir.join("api.crt"));
    let other = file_der(&dir.join("other.crt"));
    assert_ne!(api, other);
    assert_eq!(presented(&world, "api.example.test", None), Ok(api.clone()));
    assert_eq!(
        presented(&world, "v2.api.example.test", None),
        Ok(api.clone()),
        "wildcard"
    );
    assert_eq!(
        presented(&world, "static.example.test", None),
        Ok(other.clone())
    );
    assert_eq!(
        presented(&world, "STATIC.example.test", None),
        Ok(other),
        "case-insensitive"
    );
    // Names no certificate covers: the handshake fails (no default certificate configured).
    for sni in ["nobody.test", "a.b.api.example.test"] {
        let err = presented(&world, sni, None).expect_err("refused");
        assert!(
            !err.contains("not valid for name"),
            "{sni} must be refused by the edge, not served a certificate: {err}"
        );
    }
    // TLS 1.2 is still accepted; the handshake metric says which version.
    assert_eq!(
        presented(&world, "api.example.test", Some(&rustls::version::TLS12)),
        Ok(api)
    );
    let reply = world.secure_request(
        meridian_tests::Secure::H1,
        source_for("US"),
        "api.example.test",
        "/",
        &[],
    );
    assert_eq!(reply.status, 200);
    let seen = world.metric_eventually(
        r#"meridian_tls_handshakes_total{alpn="http/1.1",version="TLSv1.3"}"#,
        1.0,
    );
    assert_eq!(seen, Some(1.0), "{}", world.metrics());
}

#[test]
fn a_default_certificate_answers_unknown_names() {
    let mut config = local_config();
    config.tls.certificates[1].default = true;
    let world = World::start(config);
    // The edge presents the default certificate; the client then rightly rejects it for a
    // name it does not cover (without a default, the edge aborts the handshake instead).
    let err = presented(&world, "nobody.test", None).expect_err("name mismatch");
    assert!(
        err.contains("not valid for name") && err.contains("inference.example.test"),
        "{err}"
    );
}

#[test]
fn certificates_rotate_without_dropping_open_connections() {
    let world = World::start(local_config());
    let tls = world.tls.as_ref().expect("tls");
    let target = world.edge.https_addr.expect("https");
    let old = file_der(&tls.dir.join("api.crt"));
    let roots = tls.roots();
    world.runtime.block_on(async {
        let stream = tls_connect(
            source_for("SG"),
            target,
            "api.example.test",
            tcp_client_config(roots.clone(), &[b"h2"]),
        )
        .await
        .expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2");
        tokio::spawn(conn);
        let get = |sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>| {
            let request = http::Request::get("https://api.example.test/rotate")
                .body(Full::new(Bytes::new()))
                .expect("request");
            sender.send_request(request)
        };
        let first = get(&mut sender).await.expect("first request");
        assert_eq!(first.status(), 200);
        let _ = first.into_body().collect().await;

        // Rotate: a new key and certificate for the same hosts, written over the old files.
        tls.ca
            .leaf(&["api.example.test", "*.api.example.test"])
            .expect("leaf")
            .write(&tls.dir, "api")
            .expect("write");
        let reloaded = tokio::task::spawn_blocking({
            let admin = world.edge.admin_addr;
            move || wait_for_reload(admin)
        })
        .await
        .expect("join");
        assert!(reloaded, "the edge noticed the new certificate files");

        // The open connection keeps working...
        let second = get(&mut sender)
            .await
            .expect("same connection after rotation");
        assert_eq!(second.status(), 200);
        // ...and new handshakes get the new certificate.
        let fresh = tls_connect(
            source_for("SG"),
            target,
            "api.example.test",
            tcp_client_config(roots, &[b"h2"]),
        )
        .await
        .expect("new connection");
        let presented = fresh
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec());
        let new = file_der(&tls.dir.join("api.crt"));
        assert_ne!(new, old);
        assert_eq!(presented, Some(new));
    });
}

/// Bounded wait for `meridian_tls_certificate_reloads_total{result="ok"}` to reach 1.
fn wait_for_reload(admin: std::net::SocketAddr) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    while std::time::Instant::now() < deadline {
        let text = rt
            .block_on(meridian_tests::Client::new(admin).request(
                meridian_tests::Protocol::Http1,
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                "GET",
                "localhost",
                "/metrics",
                &[],
                Vec::new(),
            ))
            .map(|r| r.text())
            .unwrap_or_default();
        if meridian_tests::metric_value(
            &text,
            r#"meridian_tls_certificate_reloads_total{result="ok"}"#,
        )
        .is_some_and(|v| v >= 1.0)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn bad_certificate_files_are_refused_with_their_path() {
    meridian_gateway::tls::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = DevCa::new("test").expect("ca");
    let (cert, key) = ca
        .leaf(&["a.example.test"])
        .expect("leaf")
        .write(dir.path(), "a")
        .expect("write");
    let (_, other_key) = ca
        .leaf(&["b.example.test"])
        .expect("leaf")
        .write(dir.path(), "b")
        .expect("write");
    let now = SystemTime::now();
    assert!(load_certified_key(&cert, &key, now).is_ok());

    let missing = dir.path().join("missing.crt");
    let err = load_certified_key(&missing, &key, now)
        .err()
        .expect("missing file");
    assert!(matches!(err, TlsError::Read { .. }));
    assert!(err.to_string().contains("missing.crt"), "{err}");

    let err = load_certified_key(&cert, &other_key, now)
        .err()
        .expect("mismatch");
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("b.key") && err.to_string().contains("a.crt"),
        "{err}"
    );

    let past = time::OffsetDateTime::now_utc() - Duration::from_secs(30 * 86400);
    let (expired, expired_key) = ca
        .leaf_valid(
            &["old.example.test"],
            past - Duration::from_secs(86400),
            past,
        )
        .expect("leaf")
        .write(dir.path(), "old")
        .expect("write");
    let err = load_certified_key(&expired, &expired_key, now)
        .err()
        .expect("expired");
    assert!(matches!(err, TlsError::Expired { .. }), "{err}");
    assert!(err.to_string().contains("old.crt"), "{err}");

    let soon = time::OffsetDateTime::now_utc() + Duration::from_secs(3 * 86400);
    let (close, close_key) = ca
        .leaf_valid(&["soon.example.test"], past, soon)
        .expect("leaf")
        .write(dir.path(), "soon")
        .expect("write");
    let loaded = load_certified_key(&close, &close_key, now).expect("still valid");
    assert!(
        loaded
            .warning
            .as_deref()
            .is_some_and(|w| w.contains("soon.crt")),
        "warned"
    );

    // The whole table (and so an edge start) fails on the first bad entry, naming the file.
    let mut config = local_config();
    config.tls.certificates = vec![meridian_config::TlsCertificate {
        hosts: vec!["api.example.test".into()],
        cert: "a.crt".into(),
        key: "missing.key".into(),
        default: false,
    }];
    let err = CertTable::load(&config.tls, Some(dir.path()))
        .err()
        .expect("missing key");
    assert!(err.to_string().contains("missing.key"), "{err}");
    config.edge.https = Some(meridian_tests::free_local_addr().to_string());
    config.edge.http = meridian_tests::free_local_addr().to_string();
    config.edge.admin = "127.0.0.1:0".into();
    config.dns = None;
    config.geoip.database = None;
    let started = meridian_gateway::edge::RunningEdge::start(meridian_gateway::edge::EdgeOptions {
        config,
        meta: Default::default(),
        handle_signals: false,
        watch_file: None,
        base_dir: Some(dir.path().to_path_buf()),
    });
    let err = started
        .err()
        .expect("an edge with a missing key does not start");
    assert!(err.to_string().contains("missing.key"), "{err}");
}

/// A pushed document whose certificates cannot be loaded is refused as a whole: its routing change
/// does not land either, every broken file is named, and the next good document installs normally.
#[test]
fn a_document_with_unloadable_certificates_is_refused_whole() {
    let world = World::start_following(local_config());
    let served_by = |path: &str| {
        let reply = world.get_from("US", "static.example.test", path);
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply
            .header("x-meridian-region")
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(served_by("/before"), "us-east");

    // Version 2 moves `static` to Frankfurt and breaks both certificate entries.
    let mut moved = world.config.clone();
    let route = moved
        .routes
        .iter_mut()
        .find(|r| r.name == "static")
        .expect("static route");
    route.regions = meridian_config::RegionSet::List(vec!["eu-central-1".into()]);
    route.default_region = Some("eu-central-1".into());
    // Entry 0 loses its key file; entry 1 gets entry 0's key, which does not match its certificate.
    let mut broken = moved.clone();
    broken.tls.certificates[0].key = world.path("tls/missing.key").display().to_string();
    broken.tls.certificates[1].key = world.config.tls.certificates[0].key.clone();
    let refused = world.push(&broken, "moves static, broken certificates");
    assert_eq!(
        world.metric_eventually(r#"meridian_config_reloads_total{result="invalid"}"#, 1.0),
        Some(1.0),
        "the edge refused version {refused}"
    );
    assert_eq!(world.wait_for_version_once(&world.edge), 1);
    assert_eq!(served_by("/during"), "us-east", "routing did not move");
    // The same check names both broken files in one error.
    let err = CertTable::load(&broken.tls, None)
        .err()
        .expect("broken certificates");
    let text = err.to_string();
    assert!(
        matches!(err, TlsError::Several(ref all) if all.len() == 2),
        "{text}"
    );
    assert!(
        text.contains("missing.key") && text.contains("other.crt"),
        "{text}"
    );

    // Version 3: the same routing change with working certificates lands.
    let fixed = world.push(&moved, "moves static");
    assert_eq!(world.wait_for_version(&world.edge, fixed), fixed);
    assert_eq!(served_by("/after"), "eu-central-1");
    let reply = world.secure_request(
        meridian_tests::secure::Secure::H2,
        source_for("US"),
        "static.example.test",
        "/after-tls",
        &[],
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-meridian-region"), Some("eu-central-1"));
}

/// A ClientHello offering at most TLS 1.1 (legacy_version 0x0302, no supported_versions
/// extension; built by hand because rustls clients cannot offer 1.1) is answered with a fatal
/// `protocol_version` alert, never a ServerHello.
#[test]
fn tls_1_1_clients_are_refused() {
    use std::io::{Read, Write};
    let world = World::start(local_config());
    let target = world.edge.https_addr.expect("https");
    let sni = b"api.example.test";
    let mut server_name = vec![0x00]; // host_name
    server_name.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    server_name.extend_from_slice(sni);
    let mut sni_ext = (server_name.len() as u16).to_be_bytes().to_vec();
    sni_ext.extend_from_slice(&server_name);
    let mut extensions = vec![0x00, 0x00]; // server_name
    extensions.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
    extensions.extend_from_slice(&sni_ext);
    // signature_algorithms (ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256) and supported_groups
    // (x25519, secp256r1): without them rustls stops earlier, with handshake_failure.
    extensions.extend_from_slice(&[0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04]);
    extensions.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend_from_slice(&[0x5a; 32]); // random
    hello.push(0); // session id
                   // Suites rustls has (ECDHE-ECDSA/RSA-AES128-GCM-SHA256), so only the version is wrong.
    hello.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]);
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    hello.extend_from_slice(&extensions);
    let mut handshake = vec![0x01]; // client_hello
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01]; // handshake record, TLS 1.0 framing
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);

    let first_record = |record: &[u8]| {
        let mut stream = std::net::TcpStream::connect(target).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.write_all(record).expect("send hello");
        let mut reply = vec![0u8; 7];
        stream.read_exact(&mut reply).expect("a TLS record back");
        reply
    };
    // Control: the same hello saying TLS 1.2 gets a handshake record (ServerHello) back.
    let mut tls12 = record.clone();
    tls12[9..11].copy_from_slice(&[0x03, 0x03]);
    assert_eq!(first_record(&tls12)[0], 0x16, "TLS 1.2 hello answered");
    let reply = first_record(&record);
    assert_eq!(reply[0], 0x15, "alert, not a ServerHello: {reply:02x?}");
    assert_eq!(reply[5], 2, "fatal");
    assert_eq!(reply[6], 70, "protocol_version");
}
