//! Acknowledging deliveries in runs. Jobs finish out of order; once every delivery up to some
//! tag has finished, one `basic.ack` with `multiple` settles them all. That saves the broker and
//! the AMQP connection most of their per-message ack work. A run never waits long: deliveries
//! held behind a slow job are acknowledged one by one after `max_wait`, so a job waiting for a
//! rate slot cannot hold the prefetch window hostage.
//!
//! Every acknowledgement still happens only after the job's results are confirmed: a delivery is
//! reported here when the pipeline is completely through with it.
//!
//! The decisions are [`AckRuns`], a plain state machine (deliveries and finishes in, what to tell
//! the broker out); the [`Acknowledger`] task only feeds it and carries out its answers.

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

/// What to tell the broker about deliveries of the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// `basic.ack` with `multiple`: this delivery and every earlier one not yet settled.
    AckUpTo(u64),
    /// `basic.ack` of this delivery alone.
    Ack(u64),
    /// `basic.nack` with requeue: the broker delivers it again.
    Requeue(u64),
    /// `basic.reject` without requeue: the queue's dead-lettering takes it.
    Reject(u64),
}

/// The batching decisions of one channel: which deliveries are in progress, which have finished
/// and wait to be acknowledged, and since when the oldest of those has waited.
#[derive(Debug)]
pub struct AckRuns {
    in_progress: BTreeSet<u64>,
    ready: BTreeSet<u64>,
    held_since: Option<Instant>,
    max_wait: Duration,
    max_held: usize,
}

impl AckRuns {
    /// Finished deliveries wait at most `max_wait`, and at most `max_held` of them, for a run.
    pub fn new(max_wait: Duration, max_held: usize) -> Self {
        Self {
            in_progress: BTreeSet::new(),
            ready: BTreeSet::new(),
            held_since: None,
            max_wait,
            max_held: max_held.max(1),
        }
    }

    /// A delivery has started (reported in delivery order, before it can finish).
    pub fn delivered(&mut self, tag: u64) {
        self.in_progress.insert(tag);
    }

    /// The pipeline is through with a delivery. A requeue or reject is settled at once; an ack
    /// waits for the next [`tick`](Self::tick).
    pub fn finished(&mut self, tag: u64, disposition: Disposition) -> Option<Settle> {
        self.in_progress.remove(&tag);
        match disposition {
            Disposition::Ack => {
                self.ready.insert(tag);
                None
            }
            Disposition::Requeue => Some(Settle::Requeue(tag)),
            Disposition::Reject => Some(Settle::Reject(tag)),
        }
    }

    /// The acknowledgements due at `now`: one multiple ack for the finished run below the oldest
    /// delivery in progress, then, when the rest has waited long enough or is too many, each of
    /// them alone.
    pub fn tick(&mut self, now: Instant) -> Vec<Settle> {
        let mut out = self.run();
        if self.ready.is_empty() {
            self.held_since = None;
            return out;
        }
        let since = *self.held_since.get_or_insert(now);
        if self.ready.len() >= self.max_held || now.saturating_duration_since(since) >= self.max_wait {
            out.extend(self.each_alone());
        }
        out
    }

    /// Everything finished, acknowledged now (the channel is closing).
    pub fn close(&mut self) -> Vec<Settle> {
        let mut out = self.run();
        out.extend(self.each_alone());
        out
    }

    /// When the held acknowledgements are due, if any are held.
    pub fn deadline(&self) -> Option<Instant> {
        self.held_since.map(|since| since + self.max_wait)
    }

    /// Everything below the oldest delivery still in progress has finished, so one multiple ack
    /// on the highest finished tag there settles it all (requeued and rejected tags are settled
    /// already, so it does not touch them).
    fn run(&mut self) -> Vec<Settle> {
        let upto = match self.in_progress.first() {
            Some(&oldest) => self.ready.range(..oldest).next_back().copied(),
            None => self.ready.last().copied(),
        };
        let Some(tag) = upto else { return Vec::new() };
        self.ready = self.ready.split_off(&(tag + 1));
        vec![Settle::AckUpTo(tag)]
    }

    fn each_alone(&mut self) -> Vec<Settle> {
        self.held_since = None;
        std::mem::take(&mut self.ready).into_iter().map(Settle::Ack).collect()
    }
}

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
        let task = tokio::spawn(run(channel, rx, AckRuns::new(max_wait, max_held)));
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
    Due,
    Closed,
}

/// Feeds the events to `runs` as they come, in batches of whatever has queued up, and carries
/// out what it decides; wakes for held acknowledgements when they are due.
async fn run(channel: Channel, mut rx: mpsc::UnboundedReceiver<Event>, mut runs: AckRuns) {
    let mut open = true;
    while open {
        let wake = match runs.deadline() {
            None => rx.recv().await.map_or(Wake::Closed, Wake::Event),
            Some(due) => tokio::select! {
                event = rx.recv() => event.map_or(Wake::Closed, Wake::Event),
                () = tokio::time::sleep_until(due.into()) => Wake::Due,
            },
        };
        let mut events = Vec::new();
        match wake {
            Wake::Event(e) => events.push(e),
            Wake::Due => {}
            Wake::Closed => open = false,
        }
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        for event in events {
            match event {
                Event::Delivered(tag) => runs.delivered(tag),
                Event::Finished(tag, disposition) => {
                    if let Some(settle) = runs.finished(tag, disposition) {
                        send(&channel, settle).await;
                    }
                }
            }
        }
        let due = if open { runs.tick(Instant::now()) } else { runs.close() };
        for settle in due {
            send(&channel, settle).await;
        }
    }
}

async fn send(channel: &Channel, settle: Settle) {
    let (tag, sent) = match settle {
        Settle::AckUpTo(tag) => (tag, channel.basic_ack(tag, BasicAckOptions { multiple: true }).await),
        Settle::Ack(tag) => (tag, channel.basic_ack(tag, BasicAckOptions { multiple: false }).await),
        Settle::Requeue(tag) => {
            (tag, channel.basic_nack(tag, BasicNackOptions { requeue: true, multiple: false }).await)
        }
        Settle::Reject(tag) => (tag, channel.basic_reject(tag, BasicRejectOptions { requeue: false }).await),
    };
    if let Err(e) = sent {
        // The channel is gone (reconnect, shutdown): the broker redelivers, the ledger answers.
        debug!(error = %e, tag, ?settle, "could not settle a delivery; the broker will deliver it again");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::{prelude::*, sample::Index};

    use super::*;

    const MAX_WAIT: Duration = Duration::from_millis(10);

    #[test]
    fn a_run_waits_for_the_oldest_delivery_and_held_acks_go_alone_after_max_wait() {
        let t0 = Instant::now();
        let mut runs = AckRuns::new(MAX_WAIT, 100);
        (1..=5).for_each(|tag| runs.delivered(tag));
        assert_eq!(runs.finished(3, Disposition::Ack), None);
        assert_eq!(runs.finished(2, Disposition::Ack), None);
        assert_eq!(runs.tick(t0), [], "1 is in progress: 2 and 3 wait");
        assert_eq!(runs.deadline(), Some(t0 + MAX_WAIT));
        assert_eq!(runs.tick(t0 + MAX_WAIT), [Settle::Ack(2), Settle::Ack(3)], "held long enough");
        assert_eq!(runs.deadline(), None);
        assert_eq!(runs.finished(4, Disposition::Requeue), Some(Settle::Requeue(4)));
        assert_eq!(runs.finished(1, Disposition::Ack), None);
        assert_eq!(runs.tick(t0 + MAX_WAIT), [Settle::AckUpTo(1)]);
        assert_eq!(runs.finished(5, Disposition::Ack), None);
        assert_eq!(runs.tick(t0 + MAX_WAIT), [Settle::AckUpTo(5)], "covers 4, requeued already");
        assert_eq!(runs.close(), []);
    }

    #[test]
    fn too_many_held_acks_go_alone_at_once_and_close_settles_the_rest() {
        let t0 = Instant::now();
        let mut runs = AckRuns::new(MAX_WAIT, 2);
        (1..=4).for_each(|tag| runs.delivered(tag));
        runs.finished(2, Disposition::Ack);
        assert_eq!(runs.tick(t0), []);
        runs.finished(3, Disposition::Ack);
        assert_eq!(runs.tick(t0), [Settle::Ack(2), Settle::Ack(3)], "two held: the most there may be");
        runs.finished(4, Disposition::Ack);
        assert_eq!(runs.close(), [Settle::Ack(4)], "1 never finished: 4 goes alone");
    }

    /// The broker's side of the channel: deliveries not yet settled, and how each was settled.
    #[derive(Default)]
    struct Broker {
        outstanding: BTreeSet<u64>,
        settled: BTreeMap<u64, Disposition>,
    }

    impl Broker {
        /// Carries out `settle`, which must settle only outstanding deliveries, each the way the
        /// pipeline finished it (`finished`).
        fn apply(&mut self, settle: Settle, finished: &BTreeMap<u64, Disposition>) -> Result<(), TestCaseError> {
            let (tags, disposition): (Vec<u64>, _) = match settle {
                Settle::AckUpTo(tag) => {
                    // RabbitMQ closes the channel when the tag itself is not outstanding.
                    prop_assert!(self.outstanding.contains(&tag), "{:?}: {} is not outstanding", settle, tag);
                    (self.outstanding.range(..=tag).copied().collect(), Disposition::Ack)
                }
                Settle::Ack(tag) => (vec![tag], Disposition::Ack),
                Settle::Requeue(tag) => (vec![tag], Disposition::Requeue),
                Settle::Reject(tag) => (vec![tag], Disposition::Reject),
            };
            for tag in tags {
                prop_assert!(self.outstanding.remove(&tag), "{:?} settles {} twice", settle, tag);
                prop_assert_eq!(finished.get(&tag), Some(&disposition), "{:?} settles {}", settle, tag);
                self.settled.insert(tag, disposition);
            }
            Ok(())
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// The next delivery arrives.
        Deliver,
        /// One of the deliveries in progress finishes.
        Finish(Index),
        /// Some milliseconds pass, and the acknowledger looks at the clock.
        Tick(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![Just(Step::Deliver), any::<Index>().prop_map(Step::Finish), (0u64..15).prop_map(Step::Tick)]
    }

    fn disposition() -> impl Strategy<Value = Disposition> {
        prop_oneof![6 => Just(Disposition::Ack), 1 => Just(Disposition::Requeue), 1 => Just(Disposition::Reject)]
    }

    /// A channel's deliveries, their finishes in some order and the clock's ticks in between.
    struct Channel {
        runs: AckRuns,
        broker: Broker,
        dispositions: Vec<Disposition>,
        delivered: u64,
        in_progress: Vec<u64>,
        finished: BTreeMap<u64, Disposition>,
        now: Instant,
    }

    impl Channel {
        fn deliver(&mut self) {
            if (self.delivered as usize) < self.dispositions.len() {
                self.delivered += 1;
                self.broker.outstanding.insert(self.delivered);
                self.runs.delivered(self.delivered);
                self.in_progress.push(self.delivered);
            }
        }

        fn finish(&mut self, pick: &Index) -> Result<(), TestCaseError> {
            if self.in_progress.is_empty() {
                return Ok(());
            }
            let tag = self.in_progress.swap_remove(pick.index(self.in_progress.len()));
            let disposition = self.dispositions[tag as usize - 1];
            self.finished.insert(tag, disposition);
            if let Some(settle) = self.runs.finished(tag, disposition) {
                self.broker.apply(settle, &self.finished)?;
            }
            Ok(())
        }

        fn tick(&mut self, millis: u64) -> Result<(), TestCaseError> {
            self.now += Duration::from_millis(millis);
            for settle in self.runs.tick(self.now) {
                self.broker.apply(settle, &self.finished)?;
            }
            // Nothing is held past its time, nor more than allowed.
            if let Some(due) = self.runs.deadline() {
                prop_assert!(due > self.now, "acks held past max_wait");
            }
            prop_assert!(self.runs.ready.len() < self.runs.max_held);
            Ok(())
        }
    }

    proptest! {
        #[test]
        fn every_delivery_is_settled_once_with_its_own_disposition_and_runs_cover_only_finished_acks(
            dispositions in prop::collection::vec(disposition(), 1..50),
            steps in prop::collection::vec(step(), 0..250),
            tail in prop::collection::vec(any::<Index>(), 1..20),
            max_held in 1usize..8,
        ) {
            let mut channel = Channel {
                runs: AckRuns::new(MAX_WAIT, max_held),
                broker: Broker::default(),
                dispositions,
                delivered: 0,
                in_progress: Vec::new(),
                finished: BTreeMap::new(),
                now: Instant::now(),
            };
            for step in &steps {
                match step {
                    Step::Deliver => channel.deliver(),
                    Step::Finish(pick) => channel.finish(pick)?,
                    Step::Tick(millis) => channel.tick(*millis)?,
                }
            }
            // The rest arrives and finishes, in some order, then the channel closes.
            while (channel.delivered as usize) < channel.dispositions.len() {
                channel.deliver();
            }
            for pick in tail.iter().cycle().take(channel.in_progress.len()).cloned().collect::<Vec<_>>() {
                channel.finish(&pick)?;
                channel.tick(0)?;
            }
            for settle in channel.runs.close() {
                channel.broker.apply(settle, &channel.finished)?;
            }
            prop_assert!(channel.broker.outstanding.is_empty(), "unsettled: {:?}", channel.broker.outstanding);
            prop_assert_eq!(&channel.broker.settled, &channel.finished);
        }
    }
}
