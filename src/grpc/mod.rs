//! The gRPC front end (tonic): `agentca.v1.DecisionService` and `AdminService`, Envoy's
//! `ext_authz` Check, health and reflection. Proto messages become our types here and only here.

mod admin;
pub mod client;
mod convert;
mod decision;
pub(crate) mod envoy;
mod gate;
pub mod handshake;
pub mod limits;
#[cfg(feature = "tools")]
pub mod load;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::access::Access;
use crate::records::Caller;
use crate::service::Service;
use crate::tls::Tls;

/// The generated messages and services of `proto/agentca/v1/agentca.proto`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    tonic::include_proto!("agentca.v1");

    /// The encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/agentca_descriptor.bin"));
}

pub use pb::admin_service_client::AdminServiceClient;
pub use pb::decision_service_client::DecisionServiceClient;

/// Transport settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Largest message accepted or sent.
    pub max_message_bytes: usize,
    /// If set, AdminService calls need `authorization: Bearer <token>` (without `access`).
    pub admin_token: Option<String>,
    pub limits: limits::Limits,
    /// TLS on the listener (mutual if its files name a client CA).
    pub tls: Option<Arc<Tls>>,
    /// Who may ask what; without it decisions are open and admin follows `admin_token`.
    pub access: Option<Arc<Access>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_message_bytes: 4 * 1024 * 1024,
            admin_token: None,
            limits: limits::Limits::default(),
            tls: None,
            access: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves on `listener` until `shutdown` completes, then finishes the calls in flight.
pub async fn serve(
    listener: TcpListener,
    service: Arc<Service>,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let limit = options.max_message_bytes;
    let shed = Arc::new(limits::Shed::new(service.metrics().clone()));
    let batch_items = limits::BatchItems::new(options.limits.max_batch_items_in_flight);
    let decisions = pb::decision_service_server::DecisionServiceServer::new(decision::Decisions::new(
        service.clone(),
        batch_items,
        limit,
    ))
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let admin = tonic::service::interceptor::InterceptedService::new(
        pb::admin_service_server::AdminServiceServer::new(admin::Admin::new(
            service.clone(),
            options.tls.clone(),
            options.access.clone(),
            shed.clone(),
        ))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit),
        admin::authorize(options.admin_token.clone()),
    );
    let check = envoy::server(service.clone(), limit);

    // Health follows the service: SERVING once a snapshot is loaded (it is, by construction),
    // NOT_SERVING while audit writes fail under the `deny` overflow policy.
    let watcher = tokio::spawn(track_health(reporter, service.serving_changes(), service.denying_changes()));

    let limits = &options.limits;
    let accepted = limits::incoming(listener, limits, shed.clone());
    let incoming: std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<handshake::Io>> + Send>> =
        match &options.tls {
            Some(tls) => Box::pin(handshake::tls(accepted, tls.clone(), limits.handshake_timeout, shed.clone())),
            None => Box::pin(handshake::plain(accepted)),
        };
    let gate = gate::GateLayer::new(options.access.clone(), service.clone(), options.tls.is_some());
    let result = Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        // The access rules come first: a refused call never takes an in-flight slot, so callers
        // without rights cannot crowd out the kill switch.
        .layer(gate)
        .layer(limits::GuardLayer::new(limits, shed.clone()))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(decisions)
        .add_service(admin)
        .add_service(check)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    watcher.abort();
    result.map_err(ServeError::from)
}

const SERVICES: [&str; 4] =
    ["", "agentca.v1.DecisionService", "agentca.v1.AdminService", "envoy.service.auth.v3.Authorization"];

async fn track_health(
    reporter: tonic_health::server::HealthReporter,
    mut serving: watch::Receiver<bool>,
    mut denying: watch::Receiver<bool>,
) {
    let mut last = None;
    let (mut serving_open, mut denying_open) = (true, true);
    loop {
        let (audited, stale) = (*serving.borrow_and_update(), *denying.borrow_and_update());
        let status = if audited && !stale { ServingStatus::Serving } else { ServingStatus::NotServing };
        if last != Some(status) {
            for name in SERVICES {
                reporter.set_service_status(name, status).await;
            }
            if !audited {
                tracing::error!("audit writes are failing and the overflow policy is deny: reporting NOT_SERVING");
            } else if stale {
                tracing::error!(
                    "the live state is older than --live-stale-after and the policy is deny: reporting NOT_SERVING"
                );
            }
            last = Some(status);
        }
        // Both closed: the state can no longer change, and the last status stands.
        tokio::select! {
            changed = serving.changed(), if serving_open => serving_open = changed.is_ok(),
            changed = denying.changed(), if denying_open => denying_open = changed.is_ok(),
            else => return,
        }
    }
}

/// Who is calling: the peer address, the identity of its client certificate, and the name of
/// the access file's token that let the call through.
fn caller<T>(request: &tonic::Request<T>, via: &'static str) -> Caller {
    let conn = request.extensions().get::<limits::ConnInfo>();
    Caller {
        peer: conn.and_then(|c| c.peer.clone()),
        identity: conn.and_then(|c| c.identity.clone()),
        token: gate::granted_token(request),
        via,
        ..Caller::default()
    }
}
