//! Dead and parked letters: the commands that could not be settled.
//!
//! - [`dead_letter_consumer`]: consumes the dead-letter queue, marks each command's request
//!   failed (and a created order rejected), and parks the message.
//! - [`parked_letters`]: `worker dead-letters list | replay | discard`, the operators' command
//!   over the parked letters.

pub mod dead_letter_consumer;
pub mod parked_letters;
