//! A client for a running agentca (the `agentca admin` commands and the load generator).

use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::pb;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to `{addr}`: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("`{0}` is not an address such as 127.0.0.1:50051")]
    Address(String),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

/// `host:port` or a full `http://host:port` URL.
pub fn endpoint(addr: &str) -> Result<Endpoint, ClientError> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Endpoint::from_shared(url).map_err(|_| ClientError::Address(addr.to_string()))
}

pub async fn connect(addr: &str) -> Result<Channel, ClientError> {
    endpoint(addr)?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|source| ClientError::Connect { addr: addr.to_string(), source })
}

/// The admin API of a running server, with its bearer token if one is set.
pub struct Admin {
    client: pb::admin_service_client::AdminServiceClient<Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Admin {
    pub async fn connect(addr: &str, token: Option<&str>) -> Result<Admin, ClientError> {
        let token =
            match token {
                Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                    ClientError::Status(tonic::Status::invalid_argument("the admin token is not ASCII"))
                })?),
                None => None,
            };
        Ok(Admin { client: pb::admin_service_client::AdminServiceClient::new(connect(addr).await?), token })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    pub async fn signal(&mut self, s: pb::SignalRequest) -> Result<pb::SignalResponse, ClientError> {
        let r = self.request(s);
        Ok(self.client.signal(r).await?.into_inner())
    }

    /// One page of the live signals.
    pub async fn list_page(&mut self, page_token: String) -> Result<pb::ListSignalsResponse, ClientError> {
        let r = self.request(pb::ListSignalsRequest { page_size: 0, page_token });
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
        let r = self.request(pb::StatusRequest {});
        Ok(self.client.status(r).await?.into_inner())
    }

    pub async fn reload(&mut self) -> Result<pb::ReloadResponse, ClientError> {
        let r = self.request(pb::ReloadRequest {});
        Ok(self.client.reload(r).await?.into_inner())
    }
}
