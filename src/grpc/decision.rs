//! `agentca.v1.DecisionService`: Evaluate and EvaluateBatch.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::request::RawRequest;
use crate::service::{MAX_BATCH, Service};

use super::convert::item_error;
use super::pb;

pub struct Decisions {
    service: Arc<Service>,
}

impl Decisions {
    pub fn new(service: Arc<Service>) -> Self {
        Decisions { service }
    }
}

#[tonic::async_trait]
impl pb::decision_service_server::DecisionService for Decisions {
    async fn evaluate(&self, request: Request<pb::EvaluateRequest>) -> Result<Response<pb::Decision>, Status> {
        let caller = super::caller(&request, "grpc");
        let raw = RawRequest::from(request.into_inner());
        match self.service.decide(raw, &caller).await {
            Ok(decision) => Ok(Response::new(decision.into())),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }

    async fn evaluate_batch(
        &self,
        request: Request<pb::EvaluateBatchRequest>,
    ) -> Result<Response<pb::EvaluateBatchResponse>, Status> {
        let caller = super::caller(&request, "grpc");
        let requests = request.into_inner().requests;
        if requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "field `requests`: at most {MAX_BATCH} requests in a batch, got {}",
                requests.len()
            )));
        }
        let raws = requests.into_iter().map(RawRequest::from).collect();
        let results = self
            .service
            .decide_batch(raws, &caller)
            .await
            .into_iter()
            .map(|r| pb::BatchItem {
                result: Some(match r {
                    Ok(d) => pb::batch_item::Result::Decision(d.into()),
                    Err(e) => pb::batch_item::Result::Error(item_error(&e)),
                }),
            })
            .collect();
        Ok(Response::new(pb::EvaluateBatchResponse { results }))
    }
}
