//! `agentca.v1.DecisionService`: Evaluate and EvaluateBatch.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::request::RawRequest;
use crate::service::{MAX_BATCH, Service};

use super::convert::item_error;
use super::limits::BatchItems;
use super::pb;

pub struct Decisions {
    service: Arc<Service>,
    batch_items: BatchItems,
}

impl Decisions {
    pub fn new(service: Arc<Service>, batch_items: BatchItems) -> Self {
        Decisions { service, batch_items }
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
        // Batches are where memory goes: their items in flight are bounded across all callers.
        let Some(_room) = self.batch_items.try_take(requests.len()) else {
            return Err(Status::resource_exhausted(
                "the server is at its limit of batch items in flight (--max-batch-items-in-flight): retry with backoff",
            ));
        };
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
