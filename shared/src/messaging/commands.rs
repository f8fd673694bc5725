//! Commands on the broker: a stored request's command published to its partition queue.

use uuid::Uuid;

use crate::domain::command::{CommandMessage, RequestKind};
use crate::messaging::broker::{OutgoingMessage, PublishError, Publisher};
use crate::messaging::topology::Topology;

/// Publishes the command of a stored request to its partition queue and waits for the
/// broker's confirm: one message at a time, for the dead letters sent back and the parked
/// letters replayed (the api's relay and the sweeper publish slices with
/// [`Publisher::publish_in_order`]).
pub async fn publish(
    publisher: &Publisher,
    topology: &Topology,
    request_id: Uuid,
    kind: RequestKind,
    partition_key: i64,
) -> Result<(), PublishError> {
    let message = message(topology, request_id, kind, partition_key);
    publisher
        .publish(
            &topology.commands_exchange(),
            &message.routing_key,
            &message.message_id,
            &message.body,
            true,
        )
        .await
}

/// The message that carries a stored request's command to its partition queue.
pub fn message(
    topology: &Topology,
    request_id: Uuid,
    kind: RequestKind,
    partition_key: i64,
) -> OutgoingMessage {
    let partition = crate::domain::partition::partition_of(partition_key, topology.partitions);
    let message = CommandMessage { request_id, kind };
    OutgoingMessage {
        routing_key: topology.queue(kind.family(), partition),
        message_id: request_id.to_string(),
        // Serializing two plain fields cannot fail; an empty body would be dead-lettered.
        body: serde_json::to_vec(&message).unwrap_or_default(),
    }
}
