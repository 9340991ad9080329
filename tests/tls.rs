//! TLS, mutual TLS and the access rules through the real binary and real TLS connections over
//! 127.0.0.1, with certificates made here (rcgen): clients without a certificate, with an
//! untrusted or an expired one; roles by identity and by token; caller identities in the audit
//! log; certificates rotated (and a bad one kept out) while clients keep calling.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentca::grpc::pb;
use common::{Env, Server, is_allow, root, token_request};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

const ISSUER: &str = "spiffe://corp.example/ns/issuers/sa/mint";
const OPS: &str = "spiffe://corp.example/ns/ops/sa/admin";
const GATEWAY: &str = "gw.corp.example";

/// A certificate authority of the test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM.
#[derive(Clone)]
struct Pair {
    cert: String,
    key: String,
}

impl Pair {
    fn fingerprint(&self) -> String {
        let der = CertificateDer::from_pem_slice(self.cert.as_bytes()).unwrap();
        hex::encode(Sha256::digest(der.as_ref()))
    }
}

enum Name<'a> {
    Spiffe(&'a str),
    Dns(&'a str),
    Cn(&'a str),
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(&self, name: Name<'_>, server: bool, expired: bool) -> Pair {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        match name {
            Name::Spiffe(id) => params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())],
            Name::Dns(dns) => params.subject_alt_names = vec![SanType::DnsName(dns.try_into().unwrap())],
            Name::Cn(cn) => params.distinguished_name.push(DnType::CommonName, cn),
        }
        if server {
            params.subject_alt_names.push(SanType::DnsName("localhost".try_into().unwrap()));
            params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        params.extended_key_usages =
            vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair { cert: cert.pem(), key: key.serialize_pem() }
    }

    fn server(&self) -> Pair {
        self.issue(Name::Cn("agentca"), true, false)
    }

    fn client(&self, name: Name<'_>) -> Pair {
        self.issue(name, false, false)
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A rustls client configuration trusting `ca`, presenting `pair` if given.
fn client_config(ca: &str, pair: Option<&Pair>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match pair {
        Some(p) => {
            let chain = CertificateDer::pem_slice_iter(p.cert.as_bytes()).map(Result::unwrap).collect();
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(p.key.as_bytes()).unwrap()).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A TLS client that counts its connections and keeps the fingerprint of the server
/// certificate each one saw.
#[derive(Clone)]
struct Client {
    config: Arc<rustls::ClientConfig>,
    connects: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Client {
    fn new(ca: &str, pair: Option<&Pair>) -> Client {
        Client { config: client_config(ca, pair), connects: Arc::default(), seen: Arc::default() }
    }

    /// One channel (one connection, reconnected only if it drops) to `server`.
    async fn channel(&self, server: &Server) -> Result<Channel, tonic::transport::Error> {
        let addr = server.addr.clone();
        let this = self.clone();
        let connector = tower::service_fn(move |_: http::Uri| {
            let (addr, this) = (addr.clone(), this.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let name = ServerName::try_from("localhost").unwrap();
                let tls = tokio_rustls::TlsConnector::from(this.config.clone()).connect(name, tcp).await?;
                let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                this.seen.lock().unwrap().push(hex::encode(Sha256::digest(leaf.as_ref())));
                this.connects.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        Endpoint::from_static("http://localhost").connect_with_connector(connector).await
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// A handshake and the start of HTTP/2: Ok with the server certificate's fingerprint once
    /// the server answers, or the error (a TLS 1.3 server refuses a client certificate after
    /// the client has finished its side of the handshake: the refusal is the alert read next).
    async fn probe(&self, server: &Server) -> Result<String, std::io::Error> {
        let tcp = tokio::net::TcpStream::connect(&server.addr).await?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, tcp).await?;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await?;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(20), tls.read(&mut buf)).await.expect("no answer")?;
        assert!(n > 0, "the server closed the connection without a word");
        Ok(hex::encode(Sha256::digest(leaf.as_ref())))
    }
}

/// The TLS alert a refused probe received.
fn alert(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// The audit records of `path`, parsed.
fn records(path: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Keeps asking `status` until `done` says so, for 20 s at most.
async fn status_until(
    admin: &mut pb::admin_service_client::AdminServiceClient<Channel>,
    server: &Server,
    what: &str,
    done: impl Fn(&pb::StatusResponse) -> bool,
) -> pb::StatusResponse {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = admin.status(pb::StatusRequest {}).await.unwrap().into_inner();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} never happened; status {:?}\n{}", s.tls, server.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An Env with a CA, a server certificate and, for mutual TLS, the client CA in `tls/`.
struct Pki {
    env: Env,
    ca: Ca,
    server: Pair,
}

impl Pki {
    fn new() -> Pki {
        let env = Env::new();
        let ca = Ca::new("agentca test CA");
        let server = ca.server();
        let pki = Pki { env, ca, server };
        write(&pki.file("ca.pem"), &pki.ca.pem());
        write(&pki.file("tls.crt"), &pki.server.cert);
        write(&pki.file("tls.key"), &pki.server.key);
        pki
    }

    fn file(&self, name: &str) -> PathBuf {
        self.env.dir.path().join("tls").join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.file(name).to_str().unwrap().to_string()
    }

    /// `serve` with TLS (mutual if `mutual`) and `extra`.
    fn start(&self, mutual: bool, extra: &[&str]) -> Server {
        let (cert, key, ca) = (self.arg("tls.crt"), self.arg("tls.key"), self.arg("ca.pem"));
        let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
        if mutual {
            args.extend(["--tls-client-ca", &ca]);
        }
        args.extend_from_slice(extra);
        self.env.start(&args)
    }

    fn client(&self, pair: Option<&Pair>) -> Client {
        Client::new(&self.ca.pem(), pair)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_trusted_current_client_certificates() {
    let pki = Pki::new();
    let server = pki.start(true, &["--metrics-listen", "127.0.0.1:0"]);
    let issuer = pki.ca.client(Name::Spiffe(ISSUER));

    // A trusted client certificate: served, and its SPIFFE ID is the caller in the audit log.
    let ok = pki.client(Some(&issuer));
    let mut decisions = pb::decision_service_client::DecisionServiceClient::new(ok.channel(&server).await.unwrap());
    let d = decisions.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
    assert!(is_allow(&d));
    assert_eq!(ok.seen(), vec![pki.server.fingerprint()]);
    let record = records(&pki.env.path("audit.jsonl")).into_iter().find(|r| r["kind"] == "decision").unwrap();
    assert_eq!(record["caller"]["identity"], ISSUER, "{record}");
    assert_eq!(record["caller"]["via"], "grpc");

    // No certificate, one from another CA, an expired one: the handshake is refused, each
    // with its own alert, and nothing reaches a service.
    let stranger = Ca::new("another CA");
    let cases = [
        (pki.client(None), rustls::AlertDescription::CertificateRequired),
        (pki.client(Some(&stranger.client(Name::Spiffe(ISSUER)))), rustls::AlertDescription::UnknownCA),
        (
            pki.client(Some(&pki.ca.issue(Name::Spiffe(ISSUER), false, true))),
            rustls::AlertDescription::CertificateExpired,
        ),
    ];
    for (client, want) in &cases {
        let e = client.probe(&server).await.unwrap_err();
        assert_eq!(alert(&e), Some(*want), "{e}");
        let mut c = pb::decision_service_client::DecisionServiceClient::new(match client.channel(&server).await {
            Ok(channel) => channel,
            Err(_) => continue,
        });
        assert!(c.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.is_err());
    }
    // Plaintext gets nowhere either.
    if let Ok(channel) = Endpoint::from_shared(server.url()).unwrap().connect().await {
        let mut plain = pb::admin_service_client::AdminServiceClient::new(channel);
        assert!(plain.status(pb::StatusRequest {}).await.is_err());
    }

    // Status counts the refused handshakes; the log tells the first one.
    let mut admin = pb::admin_service_client::AdminServiceClient::new(ok.channel(&server).await.unwrap());
    let status = admin.status(pb::StatusRequest {}).await.unwrap().into_inner();
    let tls = status.tls.unwrap();
    assert!(tls.client_auth);
    assert_eq!(tls.fingerprint, pki.server.fingerprint());
    assert!(tls.handshakes_failed >= 6, "{tls:?}");
    // And so does /metrics (plain HTTP on its own port).
    let scraped = common::scrape(server.metrics_addr.as_ref().unwrap());
    let refused = format!("agentca_refused_total{{reason=\"tls_handshake\"}} {}\n", tls.handshakes_failed);
    assert!(scraped.contains(&refused), "{scraped}");
    assert!(tls.reload_error.is_empty());
    assert!(server.log().contains("TLS handshake failed"), "{}", server.log());
    assert_eq!(records(&pki.env.path("audit.jsonl")).iter().filter(|r| r["kind"] == "decision").count(), 1);
}

fn access_file(pki: &Pki, token: &str) -> String {
    let path = pki.file("access.toml");
    write(
        &path,
        &format!(
            r#"
[[identities]]
prefix = "spiffe://corp.example/ns/issuers/"
roles = ["decide"]

[[identities]]
identity = "{GATEWAY}"
roles = ["decide"]

[[identities]]
identity = "{OPS}"
roles = ["admin"]

[[tokens]]
name = "soc"
sha256 = "{}"
roles = ["signal", "read"]
"#,
            sha256_hex(token)
        ),
    );
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_what_each_identity_may_call() {
    let pki = Pki::new();
    let access = access_file(&pki, "soc-secret");
    let server = pki.start(true, &["--access", &access]);
    let issuer = pki.client(Some(&pki.ca.client(Name::Spiffe(ISSUER))));
    let ops = pki.client(Some(&pki.ca.client(Name::Spiffe(OPS))));
    let gateway = pki.client(Some(&pki.ca.client(Name::Dns(GATEWAY))));
    let unlisted = pki.client(Some(&pki.ca.client(Name::Cn("someone"))));

    // A token issuer decides, and may do nothing else.
    let channel = issuer.channel(&server).await.unwrap();
    let mut decisions = pb::decision_service_client::DecisionServiceClient::new(channel.clone());
    assert!(decisions.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.is_ok());
    let mut as_issuer = pb::admin_service_client::AdminServiceClient::new(channel);
    let signal = pb::SignalRequest {
        kind: "disable_agent".into(),
        target: "ag-mail-01".into(),
        reason: "test".into(),
        actor: "t".into(),
        ..Default::default()
    };
    let refused = as_issuer.signal(signal.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("`signal` role"), "{}", refused.message());
    let refused = as_issuer.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // A certificate the CA signed for an identity the file does not list: authenticated, and
    // allowed nothing.
    let mut stranger =
        pb::decision_service_client::DecisionServiceClient::new(unlisted.channel(&server).await.unwrap());
    let refused = stranger.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // The admin identity may do everything.
    let mut admin = pb::admin_service_client::AdminServiceClient::new(ops.channel(&server).await.unwrap());
    let done = admin.signal(signal).await.unwrap().into_inner();
    assert_eq!(done.seq, 1);
    assert_eq!(admin.reload(pb::ReloadRequest {}).await.unwrap().into_inner().outcome, "unchanged");
    let status = admin.status(pb::StatusRequest {}).await.unwrap().into_inner();
    let counts = status.access.unwrap();
    assert_eq!((counts.refused_no_credentials, counts.refused_bad_token, counts.refused_no_role), (0, 0, 3));

    // The disabled agent is denied now, and the issuer's decision says so.
    let d = decisions.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
    assert_eq!(d.reasons[0].code, "agent_disabled");

    // Health is open to a probe with a certificate and no role.
    let mut health = tonic_health::pb::health_client::HealthClient::new(unlisted.channel(&server).await.unwrap());
    let h = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(h.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // A gateway's Check: the gateway is the caller, the downstream principal Envoy reports
    // is the subject.
    let mut check = envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
        gateway.channel(&server).await.unwrap(),
    );
    let request = envoy_check("spiffe://corp.example/ns/apps/sa/mail-agent");
    check.check(request).await.unwrap();

    let all = records(&pki.env.path("audit.jsonl"));
    let refused: Vec<_> = all.iter().filter(|r| r["kind"] == "refused").collect();
    // Two admin calls were refused (Signal, Status); a refused decision is not an admin call.
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(refused[0]["method"], "/agentca.v1.AdminService/Signal");
    assert_eq!(refused[0]["need"], "signal");
    assert_eq!(refused[0]["reason"], "no_role");
    assert_eq!(refused[0]["caller"]["identity"], ISSUER);
    assert!(refused[0]["caller"]["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let signal = all.iter().find(|r| r["kind"] == "signal").unwrap();
    assert_eq!(signal["caller"]["identity"], OPS);
    let envoy = all.iter().find(|r| r["caller"]["via"] == "envoy").unwrap();
    assert_eq!(envoy["caller"]["identity"], GATEWAY);
    assert_eq!(envoy["caller"]["subject"], "spiffe://corp.example/ns/apps/sa/mail-agent");
    assert!(server.log().contains("call refused by the access rules"), "{}", server.log());
    assert!(server.log().contains(&format!("identity={ISSUER}")), "{}", server.log());
    assert!(agentca::audit::verify(&[pki.env.dir.path().join("audit.jsonl")]).is_ok());
}

/// `message` with `authorization: Bearer <token>`.
fn with<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn envoy_check(principal: &str) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer { principal: principal.into(), ..Default::default() }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/v1/tickets/42".into(),
                    host: "tickets.contoso.com".into(),
                    headers: [("x-agent-id".to_string(), "ag-support-01".to_string())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_the_access_file_and_the_admin_command_over_tls() {
    let pki = Pki::new();
    let access = access_file(&pki, "soc-secret");
    // TLS without client certificates: callers are known by their tokens.
    let server = pki.start(false, &["--access", &access]);
    let client = pki.client(None);
    let channel = client.channel(&server).await.unwrap();
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel.clone());

    // No credentials: UNAUTHENTICATED; wrong ones (a token the file does not know): PERMISSION_DENIED.
    let none = admin.list_signals(pb::ListSignalsRequest::default()).await.unwrap_err();
    assert_eq!(none.code(), tonic::Code::Unauthenticated, "{none}");
    let bad = admin.list_signals(with("soc-secreT", pb::ListSignalsRequest::default())).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::PermissionDenied, "{bad}");
    // The soc token reads and signals, and may not reload.
    assert!(admin.list_signals(with("soc-secret", pb::ListSignalsRequest::default())).await.is_ok());
    let reload = admin.reload(with("soc-secret", pb::ReloadRequest {})).await.unwrap_err();
    assert_eq!(reload.code(), tonic::Code::PermissionDenied, "{reload}");
    let mut decisions = pb::decision_service_client::DecisionServiceClient::new(channel);
    let decide = decisions.evaluate(with("soc-secret", token_request("ag-mail-01", "graph", "Mail.Read"))).await;
    assert_eq!(decide.unwrap_err().code(), tonic::Code::PermissionDenied);

    // `agentca admin` with the CA and a token file, over https.
    let token_file = pki.file("soc.token");
    write(&token_file, "soc-secret\n");
    let admin_cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_agentca"))
            .arg("admin")
            .args(["--server", &format!("https://{}", server.addr), "--tls-ca", &pki.arg("ca.pem")])
            .args(args)
            .current_dir(root())
            .env_remove("AGENTCA_ADMIN_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let token = token_file.to_str().unwrap();
    let (code, out, err) = admin_cli(&["--token-file", token, "disable-agent", "ag-mail-01", "--reason", "cli"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("agent_enabled ag-mail-01 = false"), "{out}");
    let (code, out, err) = admin_cli(&["--token-file", token, "status"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("client certificates not asked for"), "{out}");
    assert!(out.contains("refused 1 without credentials, 1 with a bad token, 2 without the role"), "{out}");
    let (code, _, err) = admin_cli(&["--token-file", token, "reload"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("`admin` role"), "{err}");
    let (code, _, err) = admin_cli(&["status"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("present a client certificate or `authorization: Bearer <token>`"), "{err}");
    // The token file is checked before anything is sent.
    write(&token_file, "\n");
    let (code, _, err) = admin_cli(&["--token-file", token, "status"]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("--token-file `{token}`: the file is empty")), "{err}");

    // The refused admin calls are in the audit log; the token's name (never its value) is
    // with the signal it allowed.
    let all = records(&pki.env.path("audit.jsonl"));
    let refused: Vec<_> = all.iter().filter(|r| r["kind"] == "refused").collect();
    let reasons: Vec<_> = refused.iter().map(|r| r["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["no_credentials", "bad_token", "no_role", "no_role", "no_credentials"]);
    // A known token without the role is named; an unknown one is not.
    let tokens: Vec<_> = refused.iter().map(|r| r["caller"]["token"].as_str()).collect();
    assert_eq!(tokens, [None, None, Some("soc"), Some("soc"), None]);
    let signal = all.iter().find(|r| r["kind"] == "signal").unwrap();
    assert_eq!(signal["caller"]["token"], "soc");
    let text = std::fs::read_to_string(pki.env.path("audit.jsonl")).unwrap();
    assert!(!text.contains("soc-secret") && !server.log().contains("soc-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admin_command_with_a_client_certificate() {
    let pki = Pki::new();
    let access = access_file(&pki, "soc-secret");
    let server = pki.start(true, &["--access", &access]);
    let ops = pki.ca.client(Name::Spiffe(OPS));
    write(&pki.file("ops.crt"), &ops.cert);
    write(&pki.file("ops.key"), &ops.key);
    let issuer = pki.ca.client(Name::Spiffe(ISSUER));
    write(&pki.file("issuer.crt"), &issuer.cert);
    write(&pki.file("issuer.key"), &issuer.key);
    let run = |who: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_agentca"))
            .arg("admin")
            .args(["--server", &server.addr, "--tls-ca", &pki.arg("ca.pem")])
            .args(["--tls-cert", &pki.arg(&format!("{who}.crt")), "--tls-key", &pki.arg(&format!("{who}.key"))])
            .args(args)
            .current_dir(root())
            .env_remove("AGENTCA_ADMIN_TOKEN")
            .output()
            .unwrap()
    };
    let out = run("ops", &["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run("ops", &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("client certificates required"), "{text}");
    let out = run("issuer", &["disable-agent", "ag-mail-01"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`signal` role"));
    let refused = records(&pki.env.path("audit.jsonl")).into_iter().find(|r| r["kind"] == "refused").unwrap();
    assert_eq!(refused["caller"]["identity"], ISSUER);
}

/// Points `link` at `target` in one step (a new link renamed over the old), as Kubernetes
/// swaps a Secret's `..data`.
fn symlink_swap(link: &Path, target: &str) {
    let tmp = link.with_file_name("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_reaches_new_connections_and_open_ones_keep_working() {
    let pki = Pki::new();
    // A Secret as Kubernetes mounts it: tls.crt -> ..data/tls.crt, ..data -> ..v1.
    let dir = pki.file("");
    let old = pki.server.clone();
    let new = pki.ca.server();
    for (version, pair) in [("..v1", &old), ("..v2", &new)] {
        write(&dir.join(version).join("tls.crt"), &pair.cert);
        write(&dir.join(version).join("tls.key"), &pair.key);
    }
    std::fs::remove_file(dir.join("tls.crt")).unwrap();
    std::fs::remove_file(dir.join("tls.key")).unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", dir.join("tls.key")).unwrap();
    let server = pki.start(true, &[]);

    let caller = pki.client(Some(&pki.ca.client(Name::Spiffe(ISSUER))));
    let channel = caller.channel(&server).await.unwrap();
    let mut decisions = pb::decision_service_client::DecisionServiceClient::new(channel.clone());
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel);
    assert!(is_allow(
        &decisions.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner()
    ));

    symlink_swap(&dir.join("..data"), "..v2");
    // The open connection keeps being answered while the server picks the new files up.
    let status = status_until(&mut admin, &server, "the reload", |s| {
        s.tls.as_ref().is_some_and(|t| t.fingerprint == new.fingerprint())
    })
    .await;
    let tls = status.tls.unwrap();
    assert_eq!(tls.reloads, 1);
    assert!(tls.reload_error.is_empty());
    for _ in 0..10 {
        assert!(decisions.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.is_ok());
    }
    // Still the one connection, made with the old certificate.
    assert_eq!(caller.connects.load(Ordering::SeqCst), 1);
    assert_eq!(caller.seen(), vec![old.fingerprint()]);
    // A new connection gets the new certificate, and is served.
    let fresh = pki.client(Some(&pki.ca.client(Name::Spiffe(ISSUER))));
    assert_eq!(fresh.probe(&server).await.unwrap(), new.fingerprint());
    let mut c = pb::decision_service_client::DecisionServiceClient::new(fresh.channel(&server).await.unwrap());
    assert!(c.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.is_ok());
    assert!(server.log().contains("reloaded the TLS certificate"), "{}", server.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_new_certificate_is_kept_out_and_status_says_so() {
    let pki = Pki::new();
    let server = pki.start(false, &[]);
    let client = pki.client(None);
    let mut admin = pb::admin_service_client::AdminServiceClient::new(client.channel(&server).await.unwrap());
    let old = pki.server.fingerprint();

    // A key that is not the certificate's (a rotation that wrote one file of two).
    let other = pki.ca.server();
    std::fs::write(pki.file("tls.key"), &other.key).unwrap();
    let status = status_until(&mut admin, &server, "the failed reload", |s| {
        s.tls.as_ref().is_some_and(|t| !t.reload_error.is_empty())
    })
    .await;
    let tls = status.tls.unwrap();
    assert!(
        tls.reload_error.starts_with(&format!("--tls-key `{}` does not go with", pki.arg("tls.key"))),
        "{}",
        tls.reload_error
    );
    assert!(!tls.reload_error_at.is_empty());
    assert_eq!(tls.fingerprint, old);
    assert_eq!(pki.client(None).probe(&server).await.unwrap(), old);
    assert!(server.log().contains("TLS reload failed; still serving the old certificate"), "{}", server.log());

    // Not a certificate at all, and an expired one: kept out the same way.
    std::fs::write(pki.file("tls.crt"), "not a certificate\n").unwrap();
    status_until(&mut admin, &server, "the refusal of a garbage certificate", |s| {
        s.tls.as_ref().is_some_and(|t| t.reload_error.contains("no PEM certificate"))
    })
    .await;
    let expired = pki.ca.issue(Name::Cn("agentca"), true, true);
    std::fs::write(pki.file("tls.key"), &expired.key).unwrap();
    std::fs::write(pki.file("tls.crt"), &expired.cert).unwrap();
    status_until(&mut admin, &server, "the refusal of an expired certificate", |s| {
        s.tls.as_ref().is_some_and(|t| t.reload_error.contains("expired"))
    })
    .await;
    assert_eq!(pki.client(None).probe(&server).await.unwrap(), old);

    // A good pair clears the error and is served.
    std::fs::write(pki.file("tls.key"), &other.key).unwrap();
    std::fs::write(pki.file("tls.crt"), &other.cert).unwrap();
    let status = status_until(&mut admin, &server, "the good reload", |s| {
        s.tls.as_ref().is_some_and(|t| t.fingerprint == other.fingerprint())
    })
    .await;
    assert!(status.tls.unwrap().reload_error.is_empty());
    assert_eq!(pki.client(None).probe(&server).await.unwrap(), other.fingerprint());
}

#[test]
fn bad_tls_and_access_settings_are_errors_naming_the_flag_file_and_field() {
    let pki = Pki::new();
    let serve = |args: &[&str]| {
        let (policies, state) = (pki.env.path("policies"), pki.env.path("state"));
        let out = Command::new(env!("CARGO_BIN_EXE_agentca"))
            .args(["serve", "--listen", "127.0.0.1:0", "--policies", &policies, "--audit", "off", "--state", &state])
            .args(args)
            .current_dir(root())
            .env_remove("AGENTCA_ADMIN_TOKEN")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (cert, key) = (pki.arg("tls.crt"), pki.arg("tls.key"));
    let missing = pki.arg("missing.pem");
    let (code, err) = serve(&["--tls-cert", &missing, "--tls-key", &key]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("--tls-cert `{missing}`: cannot read")), "{err}");
    let (code, err) = serve(&["--tls-cert", &cert, "--tls-key", &cert]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("--tls-key `{cert}`: no private key in it")), "{err}");
    let (code, err) = serve(&["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &key]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("--tls-client-ca `{key}`: no PEM certificate in it")), "{err}");
    let (code, err) = serve(&["--tls-cert", &cert]);
    assert_eq!(code, Some(2), "clap: --tls-key is required with --tls-cert: {err}");

    let access = pki.file("access.toml");
    write(&access, "[[identities]]\nidentity = \"x\"\nroles = [\"decide\", \"superuser\"]\n");
    let (code, err) = serve(&["--access", access.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("access file `{}`: identities[0].roles[1]: unknown role `superuser`", access.display())),
        "{err}"
    );
    write(&access, "[[tokens]]\nname = \"ci\"\nsha256 = \"abc\"\nroles = [\"decide\"]\n");
    let (code, err) = serve(&["--access", access.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("tokens[0].sha256: not a SHA-256 hash"), "{err}");
    write(&access, &format!("[[tokens]]\nname = \"ci\"\nsha256 = \"{}\"\nroles = [\"decide\"]\n", sha256_hex("t")));
    let (code, err) = serve(&["--access", access.to_str().unwrap(), "--admin-token", "secret"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--admin-token (or AGENTCA_ADMIN_TOKEN) and --access cannot be used together"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_in_the_handshake_loses_its_connection() {
    let pki = Pki::new();
    let server = pki.start(false, &["--max-connections", "1", "--tls-handshake-timeout-ms", "300"]);
    // Connects and never says a word: its place under --max-connections is given back when
    // the handshake timeout ends it (the server closes it: the read sees the end).
    let mut stalled = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(20), stalled.read(&mut buf)).await.expect("never closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // The one place is free again: a client is served, and Status counts the timeout.
    let client = pki.client(None);
    let mut admin = pb::admin_service_client::AdminServiceClient::new(client.channel(&server).await.unwrap());
    let tls = admin.status(pb::StatusRequest {}).await.unwrap().into_inner().tls.unwrap();
    assert_eq!((tls.handshakes_timed_out, tls.handshakes_failed), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_ca_decides_who_may_connect_from_then_on() {
    let pki = Pki::new();
    let server = pki.start(true, &[]);
    let next = Ca::new("next CA");
    let old_client = pki.client(Some(&pki.ca.client(Name::Spiffe(ISSUER))));
    let new_client = pki.client(Some(&next.client(Name::Spiffe(ISSUER))));
    let channel = old_client.channel(&server).await.unwrap();
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel.clone());
    assert_eq!(alert(&new_client.probe(&server).await.unwrap_err()), Some(rustls::AlertDescription::UnknownCA));

    // Both CAs during the changeover, then the new one alone.
    std::fs::write(pki.file("ca.pem"), format!("{}{}", pki.ca.pem(), next.pem())).unwrap();
    status_until(&mut admin, &server, "the first CA reload", |s| s.tls.as_ref().is_some_and(|t| t.reloads == 1)).await;
    assert!(old_client.probe(&server).await.is_ok());
    assert!(new_client.probe(&server).await.is_ok());
    std::fs::write(pki.file("ca.pem"), next.pem()).unwrap();
    status_until(&mut admin, &server, "the second CA reload", |s| s.tls.as_ref().is_some_and(|t| t.reloads == 2)).await;
    assert_eq!(alert(&old_client.probe(&server).await.unwrap_err()), Some(rustls::AlertDescription::UnknownCA));
    assert!(new_client.probe(&server).await.is_ok());
    // The connection opened under the old CA is not cut.
    let mut decisions = pb::decision_service_client::DecisionServiceClient::new(channel);
    assert!(decisions.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.is_ok());
    assert_eq!(old_client.connects.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_admin_calls_does_not_crowd_out_the_kill_switch() {
    let pki = Pki::new();
    let access = access_file(&pki, "soc-secret");
    // One admin call at a time: a refused call that took the slot (while its `refused` record
    // is written and fsynced) would turn the soc's signal away.
    let server = pki.start(false, &["--access", &access, "--max-admin-in-flight", "1"]);
    let channel = pki.client(None).channel(&server).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..16 {
        let (channel, stop) = (channel.clone(), stop.clone());
        flood.push(tokio::spawn(async move {
            let mut stranger = pb::admin_service_client::AdminServiceClient::new(channel);
            let mut refused = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let e = stranger.status(with("not-a-token", pb::StatusRequest {})).await.unwrap_err();
                // (RESOURCE_EXHAUSTED if a refused call took an in-flight slot: the signals say so.)
                assert!(matches!(e.code(), tonic::Code::PermissionDenied | tonic::Code::ResourceExhausted), "{e}");
                refused += 1;
            }
            refused
        }));
    }
    let mut soc = pb::admin_service_client::AdminServiceClient::new(channel);
    for i in 0..20 {
        let signal = pb::SignalRequest {
            kind: if i % 2 == 0 { "disable_agent" } else { "enable_agent" }.into(),
            target: "ag-mail-01".into(),
            reason: "drill".into(),
            ..Default::default()
        };
        let answer = soc.signal(with("soc-secret", signal)).await;
        assert!(answer.is_ok(), "signal {i} was turned away during the flood: {answer:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut refused = 0;
    for task in flood {
        refused += task.await.unwrap();
    }
    assert!(refused > 0, "the flood made no calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_folder_deleted_and_made_again_is_still_watched() {
    let pki = Pki::new();
    let server = pki.start(false, &[]);
    let client = pki.client(None);
    let mut admin = pb::admin_service_client::AdminServiceClient::new(client.channel(&server).await.unwrap());
    let dir = pki.file("");
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    // The whole folder goes, and comes back with a new certificate, twice: each is picked up.
    for round in 1..=2 {
        let new = pki.ca.server();
        std::fs::remove_dir_all(&dir).unwrap();
        // The server sees the files go (a failed reload; the old certificate stays) before the
        // folder comes back.
        status_until(&mut admin, &server, &format!("the failed reload of round {round}"), |s| {
            s.tls.as_ref().is_some_and(|t| !t.reload_error.is_empty())
        })
        .await;
        std::fs::create_dir(&dir).unwrap();
        write(&dir.join("ca.pem"), &ca);
        write(&dir.join("tls.key"), &new.key);
        write(&dir.join("tls.crt"), &new.cert);
        status_until(&mut admin, &server, &format!("the reload after the folder came back ({round})"), |s| {
            s.tls.as_ref().is_some_and(|t| t.fingerprint == new.fingerprint())
        })
        .await;
        assert_eq!(pki.client(None).probe(&server).await.unwrap(), new.fingerprint());
    }
}
