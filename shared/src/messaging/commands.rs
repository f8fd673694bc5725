//! Commands on the broker: a stored request's command published to its partition queue.

use uuid::Uuid;

use crate::domain::command::{CommandMessage, RequestKind};
use crate::messaging::broker::{PublishError, Publisher};
use crate::messaging::topology::Topology;

/// Publishes the command of a stored request to its partition queue and waits for the
/// broker's confirm. The API calls it after committing the request; the sweeper calls it
/// again for requests whose confirm was never recorded.
pub async fn publish(
    publisher: &Publisher,
    topology: &Topology,
    request_id: Uuid,
    kind: RequestKind,
    partition_key: i64,
) -> Result<(), PublishError> {
    let partition = crate::domain::partition::partition_of(partition_key, topology.partitions);
    let queue = topology.queue(kind.family(), partition);
    let message = CommandMessage { request_id, kind };
    // Serializing two plain fields cannot fail; an empty body would be dead-lettered.
    let body = serde_json::to_vec(&message).unwrap_or_default();
    publisher
        .publish(
            &topology.commands_exchange(),
            &queue,
            &request_id.to_string(),
            &body,
            true,
        )
        .await
}

/// The message that carries a stored request's command to its partition queue, for
/// [`Publisher::publish_in_order`](crate::messaging::broker::Publisher::publish_in_order).
pub fn message(
    topology: &Topology,
    request_id: Uuid,
    kind: RequestKind,
    partition_key: i64,
) -> crate::messaging::broker::OutgoingMessage {
    let partition = crate::domain::partition::partition_of(partition_key, topology.partitions);
    let message = CommandMessage { request_id, kind };
    crate::messaging::broker::OutgoingMessage {
        routing_key: topology.queue(kind.family(), partition),
        message_id: request_id.to_string(),
        // Serializing two plain fields cannot fail; an empty body would be dead-lettered.
        body: serde_json::to_vec(&message).unwrap_or_default(),
    }
}
