//! A client for a running agentca (the `agentca admin` commands and the load generator):
//! plaintext or TLS (with a client certificate for mutual TLS), and a bearer token.

use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::pb;
use crate::input::{InputError, printable, read_file};

/// Largest certificate, key or token file a client reads.
const MAX_CLIENT_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to `{addr}`: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("`{0}` is not an address such as 127.0.0.1:50051 or https://agentca.corp.example:50051")]
    Address(String),
    #[error("{flag} `{}`: {source}", printable(&path.display().to_string()))]
    Read { flag: &'static str, path: PathBuf, source: InputError },
    #[error("--token-file `{}`: {error}", printable(&path.display().to_string()))]
    TokenFile { path: PathBuf, error: &'static str },
    #[error("the token is not visible ASCII (an HTTP header value): no spaces, control or non-ASCII characters")]
    TokenCharacters,
    #[error("{0}")]
    Tls(&'static str),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

/// How to reach a server beyond its address.
#[derive(Debug, Clone, Default)]
pub struct Connect {
    /// `--tls-ca`: the CA that issued the server's certificate (PEM).
    pub tls_ca: Option<PathBuf>,
    /// `--tls-cert` and `--tls-key`: the client's certificate and key, for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
}

impl Connect {
    fn uses_tls(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some()
    }
}

/// Reads a bearer token from a file: its text without the line break at its end.
pub fn read_token_file(path: &Path) -> Result<String, ClientError> {
    let text = read_file(path, MAX_CLIENT_FILE_BYTES).map_err(|source| ClientError::Read {
        flag: "--token-file",
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim_end_matches(['\n', '\r']);
    if token.is_empty() {
        return Err(ClientError::TokenFile { path: path.to_path_buf(), error: "the file is empty" });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientError::TokenFile {
            path: path.to_path_buf(),
            error: "the token must be one line of visible ASCII (no spaces, control or non-ASCII characters)",
        });
    }
    Ok(token.to_string())
}

fn read(flag: &'static str, path: &Path) -> Result<String, ClientError> {
    read_file(path, MAX_CLIENT_FILE_BYTES).map_err(|source| ClientError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

/// `host:port`, or a full `http://` or `https://` URL. TLS flags make a bare address https;
/// an https URL needs `--tls-ca`.
pub fn endpoint(addr: &str, connect: &Connect) -> Result<Endpoint, ClientError> {
    let url = match addr.split_once("://") {
        Some(_) => addr.to_string(),
        None if connect.uses_tls() => format!("https://{addr}"),
        None => format!("http://{addr}"),
    };
    let https = url.starts_with("https://");
    let endpoint = Endpoint::from_shared(url).map_err(|_| ClientError::Address(addr.to_string()))?;
    if !https {
        if connect.uses_tls() {
            return Err(ClientError::Tls(
                "--tls-ca, --tls-cert and --tls-key need TLS: give https:// or a bare address",
            ));
        }
        return Ok(endpoint);
    }
    let Some(ca) = &connect.tls_ca else {
        return Err(ClientError::Tls("https needs --tls-ca FILE: the CA that issued the server's certificate"));
    };
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
    match (&connect.tls_cert, &connect.tls_key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(read("--tls-cert", cert)?, read("--tls-key", key)?));
        }
        (None, None) => {}
        _ => return Err(ClientError::Tls("--tls-cert and --tls-key go together")),
    }
    endpoint.tls_config(config).map_err(|source| ClientError::Connect { addr: addr.to_string(), source })
}

pub async fn connect(addr: &str, options: &Connect) -> Result<Channel, ClientError> {
    endpoint(addr, options)?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|source| ClientError::Connect { addr: addr.to_string(), source })
}

/// Adds `authorization: Bearer <token>` to every call, if there is a token.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, ClientError> {
        match token {
            Some(t) => {
                if !t.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ClientError::TokenCharacters);
                }
                let value = format!("Bearer {t}").parse().map_err(|_| ClientError::TokenCharacters)?;
                Ok(Bearer(Some(value)))
            }
            None => Ok(Bearer(None)),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            request.metadata_mut().insert("authorization", t.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the bearer token.
pub type Authed = InterceptedService<Channel, Bearer>;

/// A DecisionService client on `channel`, sending `token`.
pub fn decisions(
    channel: Channel,
    token: Option<&str>,
) -> Result<pb::decision_service_client::DecisionServiceClient<Authed>, ClientError> {
    Ok(pb::decision_service_client::DecisionServiceClient::with_interceptor(channel, Bearer::new(token)?))
}

/// The admin API of a running server.
pub struct Admin {
    client: pb::admin_service_client::AdminServiceClient<Authed>,
}

impl Admin {
    pub async fn connect(addr: &str, options: &Connect) -> Result<Admin, ClientError> {
        let bearer = Bearer::new(options.token.as_deref())?;
        let channel = connect(addr, options).await?;
        Ok(Admin { client: pb::admin_service_client::AdminServiceClient::with_interceptor(channel, bearer) })
    }

    pub async fn signal(&mut self, s: pb::SignalRequest) -> Result<pb::SignalResponse, ClientError> {
        Ok(self.client.signal(s).await?.into_inner())
    }

    /// One page of the live signals.
    pub async fn list_page(&mut self, page_token: String) -> Result<pb::ListSignalsResponse, ClientError> {
        let r = pb::ListSignalsRequest { page_size: 0, page_token };
        Ok(self.client.list_signals(r).await?.into_inner())
    }

    /// Every live signal, page after page.
    pub async fn list(&mut self) -> Result<Vec<pb::LiveSignal>, ClientError> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = self.list_page(token.clone()).await?;
            all.extend(page.signals);
            // A token that does not move on would loop for ever.
            if page.next_page_token.is_empty() || page.next_page_token == token {
                return Ok(all);
            }
            token = page.next_page_token;
        }
    }

    pub async fn status(&mut self) -> Result<pb::StatusResponse, ClientError> {
        Ok(self.client.status(pb::StatusRequest {}).await?.into_inner())
    }

    pub async fn fleet(&mut self) -> Result<pb::FleetResponse, ClientError> {
        Ok(self.client.fleet(pb::FleetRequest {}).await?.into_inner())
    }

    pub async fn reload(&mut self) -> Result<pb::ReloadResponse, ClientError> {
        Ok(self.client.reload(pb::ReloadRequest {}).await?.into_inner())
    }

    pub async fn apply_directory(
        &mut self,
        c: pb::DirectoryChange,
    ) -> Result<pb::DirectoryChangeResponse, ClientError> {
        Ok(self.client.apply_directory(c).await?.into_inner())
    }

    /// The served directory as a `directory.json` document, with the revision and the live
    /// sequence number it reflects.
    pub async fn export_directory(&mut self) -> Result<(Vec<u8>, String, u64), ClientError> {
        let mut stream = self.client.export_directory(pb::ExportDirectoryRequest {}).await?.into_inner();
        let (mut data, mut revision, mut live_seq) = (Vec::new(), String::new(), 0);
        while let Some(chunk) = stream.message().await? {
            if data.is_empty() && revision.is_empty() {
                (revision, live_seq) = (chunk.revision, chunk.live_seq);
            }
            data.extend_from_slice(&chunk.data);
        }
        Ok((data, revision, live_seq))
    }
}
