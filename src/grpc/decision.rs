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
    /// Largest answer sent: one larger is RESOURCE_EXHAUSTED, as a request would be.
    max_message_bytes: usize,
}

impl Decisions {
    pub fn new(service: Arc<Service>, batch_items: BatchItems, max_message_bytes: usize) -> Self {
        Decisions { service, batch_items, max_message_bytes }
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
            self.service.metrics().refused(crate::metrics::Refusal::BatchItems);
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
        let response = pb::EvaluateBatchResponse { results };
        // tonic would answer OUT_OF_RANGE while encoding; say what to do instead. The decisions
        // are audited, and no caller acts on decisions it never received.
        let size = prost::Message::encoded_len(&response);
        if size > self.max_message_bytes {
            return Err(Status::resource_exhausted(format!(
                "the batch's decisions take {size} bytes, more than the message limit of {} (--max-message-bytes): send fewer items",
                self.max_message_bytes
            )));
        }
        Ok(Response::new(response))
    }
}
