//! Acknowledging deliveries in runs. Jobs finish out of order; once every delivery up to some
//! tag has finished, one `basic.ack` with `multiple` settles them all. That saves the broker and
//! the AMQP connection most of their per-message ack work. A run never waits long: deliveries
//! held behind a slow job are acknowledged one by one after `max_wait`, so a job waiting for a
//! rate slot cannot hold the prefetch window hostage.
//!
//! Every acknowledgement still happens only after the job's results are confirmed: a delivery is
//! reported here when the pipeline is completely through with it.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use lapin::{
    Channel,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::debug;

use crate::worker::Disposition;

enum Event {
    Delivered(u64),
    Finished(u64, Disposition),
}

/// Reports deliveries and their outcomes to the channel's acknowledger. Cheap to clone.
#[derive(Clone)]
pub struct AckHandle {
    tx: mpsc::UnboundedSender<Event>,
}

impl AckHandle {
    /// A delivery has started (call in delivery order, before it can finish).
    pub fn delivered(&self, tag: u64) {
        let _ = self.tx.send(Event::Delivered(tag));
    }

    /// The pipeline is through with a delivery.
    pub fn finished(&self, tag: u64, disposition: Disposition) {
        let _ = self.tx.send(Event::Finished(tag, disposition));
    }
}

/// The acknowledger of one consumer channel.
pub struct Acknowledger {
    handle: AckHandle,
    task: JoinHandle<()>,
}

impl Acknowledger {
    pub fn start(channel: Channel, max_wait: Duration, max_held: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(channel, rx, max_wait, max_held.max(1)));
        Self { handle: AckHandle { tx }, task }
    }

    pub fn handle(&self) -> AckHandle {
        self.handle.clone()
    }

    /// Settles what has finished, once every handle is dropped; waits for it.
    pub async fn close(self) {
        drop(self.handle);
        let _ = self.task.await;
    }
}

enum Wake {
    Event(Event),
    Timer,
    Closed,
}

async fn run(channel: Channel, mut rx: mpsc::UnboundedReceiver<Event>, max_wait: Duration, max_held: usize) {
    let mut in_progress = BTreeSet::new();
    let mut ready = BTreeSet::new();
    let mut held_since: Option<Instant> = None;
    let mut open = true;
    while open {
        let wake = match held_since {
            None => rx.recv().await.map_or(Wake::Closed, Wake::Event),
            Some(since) => tokio::select! {
                event = rx.recv() => event.map_or(Wake::Closed, Wake::Event),
                _ = tokio::time::sleep_until((since + max_wait).into()) => Wake::Timer,
            },
        };
        let mut events = Vec::new();
        match wake {
            Wake::Event(e) => events.push(e),
            Wake::Timer => {}
            Wake::Closed => open = false,
        }
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        for event in events {
            match event {
                Event::Delivered(tag) => {
                    in_progress.insert(tag);
                }
                Event::Finished(tag, Disposition::Ack) => {
                    in_progress.remove(&tag);
                    ready.insert(tag);
                }
                Event::Finished(tag, Disposition::Reject) => {
                    in_progress.remove(&tag);
                    if let Err(e) = channel.basic_reject(tag, BasicRejectOptions { requeue: false }).await {
                        debug!(error = %e, tag, "could not reject a delivery; the broker redelivers it anyway");
                    }
                }
                Event::Finished(tag, Disposition::Requeue) => {
                    in_progress.remove(&tag);
                    let options = BasicNackOptions { requeue: true, multiple: false };
                    if let Err(e) = channel.basic_nack(tag, options).await {
                        debug!(error = %e, tag, "could not requeue a delivery; the broker redelivers it anyway");
                    }
                }
            }
        }
        // Everything below the oldest delivery still in progress has finished, so one multiple
        // ack on the highest finished tag there settles it all (nacked tags are already gone).
        let upto = match in_progress.first() {
            Some(&oldest) => ready.range(..oldest).next_back().copied(),
            None => ready.last().copied(),
        };
        if let Some(tag) = upto {
            ack(&channel, tag, true).await;
            ready = ready.split_off(&(tag + 1));
        }
        if ready.is_empty() {
            held_since = None;
            continue;
        }
        let since = *held_since.get_or_insert_with(Instant::now);
        if !open || ready.len() >= max_held || since.elapsed() >= max_wait {
            for tag in std::mem::take(&mut ready) {
                ack(&channel, tag, false).await;
            }
            held_since = None;
        }
    }
}

async fn ack(channel: &Channel, tag: u64, multiple: bool) {
    if let Err(e) = channel.basic_ack(tag, BasicAckOptions { multiple }).await {
        // The channel is gone (reconnect, shutdown): the broker redelivers, the ledger answers.
        debug!(error = %e, tag, multiple, "could not acknowledge; the broker will deliver again");
    }
}
