//! The sync target's rate controller (docs/protocol.md, "Resync", "The rate controller"): how
//! many bytes of resync requests the target may have out, and when.
//!
//! Every step (100 ms of the core's time) the controller measures the bytes that were written
//! (or found the same) since the last step, and decides how many bytes should be in flight:
//! `fill_target` when set, else what keeps the measured rate with `delay_target` of queueing
//! (`rate * delay_target`). The difference between that and what is in flight plus what is
//! already planned is spread over the next `plan_ahead / step` steps (a FIFO of corrections).
//! A step may request what arrived during the last one plus its slot of the plan, at most
//! `max_rate * step`; the step's budget is earned evenly as the step goes, not handed out at
//! once.
//!
//! Our additions to the scheme DRBD made known, each for a failure we saw on a fast link:
//! * the first step is bounded only by the wanted level in flight (nothing is measured yet), and
//!   later, below the wanted level a step may close the gap to it at once, but request at most
//!   twice what the last one moved (a slow start: the plan alone adds `fill_target / slots` per
//!   step, seconds to reach several hundred MiB/s);
//! * what arrived counts as the last step's bytes or the average of the last ten steps,
//!   whichever is more: one step in which the source stalled (a flush) does not collapse the
//!   budget, which the plan would take seconds to rebuild;
//! * never more than the wanted level is in flight (plus one request): a budget the source
//!   cannot keep up with does not queue up in front of the application's writes;
//! * a step with nothing in flight may always request one request (a resync never stalls at a
//!   budget of 0).
//!
//! With `plan_ahead` 0 the controller is off: the target keeps a fixed window in flight
//! (`fill_target`, or [`FIXED_WINDOW`] when that is 0) at most at `fixed_rate` (`resync_rate`).
//!
//! In both modes, while the source's application writes replicate here, the target keeps a
//! single request in flight as long as the resync's measured rate is above `min_rate`.
//!
//! Everything here is plain arithmetic on the times passed in: no clock is read.

use std::collections::VecDeque;

use crate::core::{Tick, BLOCK_SIZE};

/// One step of the controller: 100 ms, the period of the daemon's ticks.
pub const STEP: Tick = 100_000_000;
/// The most bytes the controller ever wants in flight (also the largest `fill_target`).
pub const MAX_IN_FLIGHT: u64 = 64 << 20;
/// The first step's budget: more than any link moves in 100 ms (10 GiB/s).
const FIRST_STEP_BUDGET: u64 = 1 << 30;
/// The window of the fixed mode (`plan_ahead` 0) when `fill_target` is 0.
pub const FIXED_WINDOW: u64 = 8 << 20;
/// How long after the last application write the resync stays in its yielding mode.
pub const APPLICATION_QUIET: Tick = 100_000_000;
/// The measured rate (for `min_rate`) is the average over this many steps.
const RATE_WINDOW_STEPS: usize = 10;
const SECOND: u128 = 1_000_000_000;

/// How the sync target paces its requests; settable per resource (`c_*` keys and
/// `resync_rate`, README "Resync").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateControl {
    /// `c_plan_ahead`: the horizon over which a correction is spread; 0 turns the controller
    /// off (fixed mode).
    pub plan_ahead: Tick,
    /// `c_fill_target`: bytes to keep in flight; 0: use `delay_target`.
    pub fill_target: u64,
    /// `c_delay_target`: with `fill_target` 0, keep the measured rate with this much delay.
    pub delay_target: Tick,
    /// `c_max_rate`: bytes per second the controller never exceeds (0: no bound).
    pub max_rate: u64,
    /// `c_min_rate`: while application writes replicate, the resync yields (one request in
    /// flight) only while its rate is above this (bytes per second; 0: never yields).
    pub min_rate: u64,
    /// `resync_rate`: the rate of the fixed mode (bytes per second; 0: unlimited).
    pub fixed_rate: u64,
}

impl Default for RateControl {
    fn default() -> Self {
        RateControl {
            plan_ahead: 2 * SECOND as Tick,
            fill_target: 8 << 20,
            delay_target: SECOND as Tick,
            max_rate: 0,
            min_rate: 4 << 20,
            fixed_rate: 0,
        }
    }
}

impl RateControl {
    /// The controller runs (`plan_ahead` > 0).
    pub fn dynamic(&self) -> bool {
        self.plan_ahead > 0
    }

    /// The bound on the rate in bytes per second in force (0: none).
    fn rate_cap(&self) -> u64 {
        if self.dynamic() {
            self.max_rate
        } else {
            self.fixed_rate
        }
    }
}

/// The observable state of the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PacerStatus {
    /// This step's request budget in bytes per second (`None` with the controller off).
    pub planned_rate: Option<u64>,
    /// Yielding to application writes: one request in flight.
    pub yielding: bool,
}

/// A token bucket: bytes earned at a rate, up to a cap. Kept in bytes times `per` (the rate's
/// time unit), so that frequent top-ups lose nothing to rounding.
#[derive(Debug, Clone)]
struct Bucket {
    scaled: u128,
    at: Tick,
    per: Tick,
}

impl Bucket {
    fn new(bytes: u64, now: Tick, per: Tick) -> Self {
        Bucket {
            scaled: u128::from(bytes) * u128::from(per),
            at: now,
            per,
        }
    }

    /// Earns `rate` bytes per `per` from the last top-up until `now`, keeping at most `cap`.
    fn top_up(&mut self, rate: u64, cap: u64, now: Tick) {
        let elapsed = now.saturating_sub(self.at);
        self.at = self.at.max(now);
        self.scaled = (self.scaled + u128::from(rate) * u128::from(elapsed))
            .min(u128::from(cap) * u128::from(self.per));
    }

    fn bytes(&self) -> u64 {
        (self.scaled / u128::from(self.per)).min(u128::from(u64::MAX)) as u64
    }

    fn take(&mut self, bytes: u64) {
        self.scaled = self
            .scaled
            .saturating_sub(u128::from(bytes) * u128::from(self.per));
    }
}

/// The controller of one resync, on its target.
#[derive(Debug, Clone)]
pub struct Pacer {
    config: RateControl,
    /// The largest request, in bytes (a whole number of blocks).
    request_size: u64,
    /// When the current step started.
    step_start: Tick,
    /// The current step's budget: the bytes it may request, earned evenly over the step (at
    /// most one step's worth saved up).
    budget: u64,
    /// The bytes the last step wanted in flight.
    want: u64,
    earned: Bucket,
    /// Bytes settled (written or found the same) since the step started.
    settled: u64,
    /// The corrections planned for the next steps, first the next one, and their sum.
    plan: VecDeque<i64>,
    planned: i64,
    /// The last steps' settled bytes and lengths, for the measured rate.
    history: VecDeque<(u64, Tick)>,
    /// The rate cap's allowance (`c_max_rate`, or `resync_rate` with the controller off).
    allowance: Bucket,
    /// Application writes of the source arrived until about this time.
    application_busy_until: Tick,
    yielding: bool,
}

impl Pacer {
    /// A resync's transfer starts now. `request_bytes`: the largest request the target makes.
    pub fn new(config: &RateControl, request_bytes: u64, now: Tick) -> Self {
        let cap = config.rate_cap();
        // At a low rate cap, small requests keep the flow smooth.
        let mut request_size = request_bytes;
        if cap > 0 {
            request_size = request_size.min(per_step(cap));
        }
        let request_size = (request_size / BLOCK_SIZE).max(1) * BLOCK_SIZE;
        let slots = (config.plan_ahead / STEP).max(1) as usize;
        // Nothing is measured yet: the first step has no budget to speak of, only the wanted
        // level in flight bounds it (as a window would; with a delay target, one request).
        let mut budget = FIRST_STEP_BUDGET;
        if config.max_rate > 0 {
            budget = budget.min(per_step(config.max_rate).max(request_size));
        }
        Pacer {
            config: config.clone(),
            request_size,
            step_start: now,
            budget,
            want: config.fill_target.min(MAX_IN_FLIGHT),
            earned: Bucket::new(budget, now, STEP),
            settled: 0,
            plan: std::iter::repeat_n(0, slots).collect(),
            planned: 0,
            history: VecDeque::with_capacity(RATE_WINDOW_STEPS),
            allowance: Bucket::new(0, now, SECOND as Tick),
            application_busy_until: 0,
            yielding: false,
        }
    }

    /// An application write of the source arrived: yield for a while.
    pub fn application_write(&mut self, now: Tick) {
        self.application_busy_until = now.saturating_add(APPLICATION_QUIET);
    }

    /// Bytes of a request were written here (or found the same): they left the flight.
    pub fn settled(&mut self, bytes: u64) {
        self.settled = self.settled.saturating_add(bytes);
    }

    /// A request of `len` bytes went out.
    pub fn requested(&mut self, len: u64) {
        self.earned.take(len);
        self.allowance.take(len);
    }

    /// The largest next request in bytes, with `in_flight` bytes requested and not yet settled;
    /// 0: none now. Runs the steps that are due first.
    pub fn next_request(&mut self, now: Tick, in_flight: u64) -> u64 {
        self.advance(now, in_flight);
        // Yield to the application: while its writes replicate here, one request in flight
        // (unless the resync would fall below min_rate).
        self.yielding = now < self.application_busy_until
            && self.config.min_rate > 0
            && self
                .measured_rate()
                .is_none_or(|rate| rate > self.config.min_rate);
        if self.yielding && in_flight >= self.request_size {
            return 0;
        }
        let mut limit = self.request_size;
        if self.config.dynamic() {
            // Never more than the wanted level in flight: a stall of the source must not queue
            // whole steps of requests in front of the application's writes.
            if in_flight >= self.want.max(self.request_size) {
                return 0;
            }
            self.earned.top_up(self.budget, self.budget, now);
            // What was earned so far, at least a block: waiting for a whole request's worth
            // would hold single-block requests (scattered dirty blocks) to one per event.
            let earned = self.earned.bytes();
            if earned < BLOCK_SIZE {
                return 0;
            }
            limit = limit.min(earned);
        } else {
            let window = match self.config.fill_target {
                0 => FIXED_WINDOW,
                fill => fill,
            };
            if in_flight >= window {
                return 0;
            }
        }
        let cap = self.config.rate_cap();
        if cap > 0 {
            self.allowance
                .top_up(cap, per_step(cap).max(self.request_size), now);
            // A request of what the allowance holds: the dirty runs may be single blocks, and
            // waiting for a whole request's worth each time would let one request out per
            // tick or completion (23 a second for scattered blocks at 2 MiB/s).
            let available = self.allowance.bytes();
            if available < BLOCK_SIZE {
                return 0;
            }
            limit = limit.min(available);
        }
        limit / BLOCK_SIZE * BLOCK_SIZE
    }

    /// The steps due by `now`: one controller step for all of them (a late tick does not make
    /// several steps' budgets at once).
    fn advance(&mut self, now: Tick, in_flight: u64) {
        let steps = now.saturating_sub(self.step_start) / STEP;
        if steps == 0 {
            return;
        }
        self.step_start += steps * STEP;
        let elapsed = steps * STEP;
        let settled = std::mem::take(&mut self.settled);
        if self.history.len() == RATE_WINDOW_STEPS {
            self.history.pop_front();
        }
        self.history.push_back((settled, elapsed));
        if !self.config.dynamic() {
            return;
        }
        // What the last budget earned until the step began.
        self.earned
            .top_up(self.budget, self.budget, self.step_start);
        let rate = (u128::from(settled) * SECOND / u128::from(elapsed)) as u64;
        let want = match self.config.fill_target {
            0 => (u128::from(rate) * u128::from(self.config.delay_target) / SECOND) as u64,
            fill => fill,
        }
        .min(MAX_IN_FLIGHT);
        self.want = want;
        // Spread the correction over the plan; the first slot takes the remainder.
        let correction = want as i64 - in_flight.min(i64::MAX as u64) as i64 - self.planned;
        let slots = self.plan.len() as i64;
        for slot in self.plan.iter_mut() {
            *slot += correction / slots;
        }
        if let Some(first) = self.plan.front_mut() {
            *first += correction % slots;
        }
        self.planned += correction;
        // The slots of the steps that passed are due (all of them after a long pause).
        let mut due = 0i64;
        for _ in 0..steps.min(slots as u64) {
            let slot = self.plan.pop_front().unwrap_or(0);
            self.plan.push_back(0);
            self.planned -= slot;
            due += slot;
        }
        // What settled replaces itself: the last step's bytes, or the average of the last
        // steps if that is more (one slow step, a flush at the source, does not collapse the
        // budget; the cap on what is in flight keeps the excess from queueing).
        let recent = self.average_step().unwrap_or(settled);
        let mut budget = (settled.max(recent) as i64).saturating_add(due).max(0) as u64;
        if in_flight < want {
            // Slow start: below the wanted level, close the gap at once, but at most twice
            // what the last step moved (the plan alone would add `want / slots` a step).
            let gap = want - in_flight;
            budget = budget.max(settled.saturating_mul(2).min(settled.saturating_add(gap)));
        }
        if in_flight == 0 {
            budget = budget.max(self.request_size);
        }
        if self.config.max_rate > 0 {
            budget = budget.min(per_step(self.config.max_rate).max(self.request_size));
        }
        self.budget = budget.max(BLOCK_SIZE);
        // Saved up: at most one step of the new budget.
        self.earned.top_up(0, self.budget, self.step_start);
    }

    /// The bytes settled per step, on average over the last steps.
    fn average_step(&self) -> Option<u64> {
        self.measured_rate()
            .map(|rate| (u128::from(rate) * u128::from(STEP) / SECOND) as u64)
    }

    /// The average rate of the last steps, in bytes per second; `None` before the first step.
    pub fn measured_rate(&self) -> Option<u64> {
        let (bytes, time) = self
            .history
            .iter()
            .fold((0u128, 0u128), |(b, t), (bytes, time)| {
                (b + u128::from(*bytes), t + u128::from(*time))
            });
        (time > 0).then(|| (bytes * SECOND / time) as u64)
    }

    pub fn status(&self) -> PacerStatus {
        PacerStatus {
            // Nothing is planned before the first step.
            planned_rate: (self.config.dynamic() && !self.history.is_empty())
                .then(|| (u128::from(self.budget) * SECOND / u128::from(STEP)) as u64),
            yielding: self.yielding,
        }
    }
}

/// Bytes of one step at `rate` bytes per second.
fn per_step(rate: u64) -> u64 {
    (u128::from(rate) * u128::from(STEP) / SECOND) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Tick = 1_000_000;
    const S: Tick = 1_000 * MS;
    const MIB: u64 = 1 << 20;
    const REQUEST: u64 = 256 << 10;
    /// The model's clock advances in steps of this.
    const RESOLUTION: Tick = MS / 10;

    /// A link to a sync source and back: requests are served one after the other at
    /// `bandwidth`, and each answer is written `latency` after its service ended.
    struct Model {
        pacer: Pacer,
        now: Tick,
        started: Tick,
        bandwidth: u64,
        latency: Tick,
        busy_until: Tick,
        flights: VecDeque<(Tick, u64)>,
        in_flight: u64,
        requested: u64,
        settled: u64,
        /// Every request: when, the bytes in flight before it, and its length.
        log: Vec<(Tick, u64, u64)>,
        /// The source serves nothing for `.1` at the start of every `.0` (a disk that stalls
        /// for its flushes, say).
        stalls: Option<(Tick, Tick)>,
        /// The longest dirty run: requests are no longer than this (scattered blocks).
        longest_run: u64,
    }

    impl Model {
        fn new(config: RateControl, bandwidth: u64, latency: Tick) -> Self {
            let now = 1_000 * S;
            Model {
                pacer: Pacer::new(&config, REQUEST, now),
                now,
                started: now,
                bandwidth,
                latency,
                busy_until: now,
                flights: VecDeque::new(),
                in_flight: 0,
                requested: 0,
                settled: 0,
                log: Vec::new(),
                stalls: None,
                longest_run: u64::MAX,
            }
        }

        /// What the target's `request_more` does: requests while the pacer allows.
        fn request(&mut self) {
            loop {
                let len = self.pacer.next_request(self.now, self.in_flight);
                if len == 0 {
                    break;
                }
                assert!(len <= REQUEST && len % BLOCK_SIZE == 0, "{len}");
                let len = len.min(self.longest_run);
                self.log.push((self.now, self.in_flight, len));
                self.pacer.requested(len);
                self.requested += len;
                self.in_flight += len;
                let mut start = self.now.max(self.busy_until);
                if let Some((period, length)) = self.stalls {
                    let into = (start - self.started) % period;
                    if into < length {
                        start += length - into;
                    }
                }
                self.busy_until = start + len * S / self.bandwidth;
                self.flights
                    .push_back((self.busy_until + self.latency, len));
            }
        }

        /// Answers that are due are written (each one asks for more).
        fn complete(&mut self) {
            while self
                .flights
                .front()
                .is_some_and(|(due, _)| *due <= self.now)
            {
                let (_, len) = self.flights.pop_front().unwrap();
                self.in_flight -= len;
                self.settled += len;
                self.pacer.settled(len);
                self.request();
            }
        }

        /// Runs for `time` with a tick every `tick`, calling `each` after every tick.
        fn run(&mut self, time: Tick, tick: Tick, mut each: impl FnMut(&mut Self)) {
            let end = self.now + time;
            let mut next_tick = self.now;
            while self.now < end {
                self.complete();
                if self.now >= next_tick {
                    self.request();
                    next_tick += tick;
                    each(self);
                }
                self.now += RESOLUTION;
            }
        }

        /// Bytes per second settled over `time` from now on.
        fn rate_over(&mut self, time: Tick) -> u64 {
            let before = self.settled;
            self.run(time, STEP, |_| {});
            (self.settled - before) * S / time
        }

        fn elapsed(&self) -> Tick {
            self.now - self.started
        }
    }

    fn dynamic() -> RateControl {
        RateControl {
            min_rate: 0,
            ..RateControl::default()
        }
    }

    #[test]
    fn the_controller_converges_to_the_fill_target() {
        // Bandwidth-bound: the requests queue at the source; the queue settles at the fill
        // target and the link stays busy.
        let mut model = Model::new(dynamic(), 400 * MIB, MS);
        model.run(10 * S, STEP, |_| {});
        let mut samples = Vec::new();
        model.run(5 * S, STEP, |m| samples.push(m.in_flight));
        let average = samples.iter().sum::<u64>() / samples.len() as u64;
        let fill = 8 * MIB;
        assert!(
            average > fill * 3 / 4 && average < fill * 5 / 4,
            "in flight {average} against {fill}"
        );
        assert!(samples.iter().all(|s| *s < 2 * fill), "{samples:?}");
        assert!(model.rate_over(2 * S) > 400 * MIB * 95 / 100);
        assert_eq!(
            model.pacer.status().planned_rate.map(|r| r / MIB),
            Some(400)
        );

        // Latency-bound: 20 ms of latency and plenty of bandwidth; in flight settles at the
        // fill target, so the rate at fill / latency.
        let config = RateControl {
            fill_target: 2 * MIB,
            ..dynamic()
        };
        let mut model = Model::new(config, 10_000 * MIB, 20 * MS);
        model.run(10 * S, STEP, |_| {});
        let rate = model.rate_over(5 * S);
        assert!(
            rate > 80 * MIB && rate < 120 * MIB,
            "{} MiB/s against 100",
            rate / MIB
        );
    }

    #[test]
    fn a_stalling_source_neither_slows_the_resync_nor_queues_more() {
        // The source serves nothing for 150 ms of every 700 (its disk flushing, say): the
        // step after a stall settles little, but the budget follows the average of the last
        // steps, and what is in flight stays at the fill target meanwhile.
        let mut model = Model::new(dynamic(), 600 * MIB, 5 * MS);
        model.stalls = Some((700 * MS, 150 * MS));
        model.run(2 * S, STEP, |_| {});
        let mut most = 0;
        let before = model.settled;
        model.run(7 * S, MS, |m| most = most.max(m.in_flight));
        let rate = (model.settled - before) / 7;
        // 600 MiB/s for 550 ms of every 700: 471 MiB/s at most.
        assert!(rate > 420 * MIB, "{} MiB/s", rate / MIB);
        assert!(most <= 8 * MIB + REQUEST, "{} KiB in flight", most / 1024);
    }

    #[test]
    fn a_fast_link_reaches_its_rate_quickly() {
        // The first step is bounded only by the fill target in flight (as the window was):
        // from the start, the link's rate, and never more than the fill target queued.
        let mut model = Model::new(dynamic(), 600 * MIB, 5 * MS);
        let mut most = 0;
        let before = model.settled;
        model.run(S, MS, |m| most = most.max(m.in_flight));
        assert!(most <= 8 * MIB + REQUEST, "{} KiB in flight", most / 1024);
        assert!(model.settled - before > 600 * MIB * 9 / 10);
        // The slow start, after the resync yielded to application writes for a second: the
        // budget closes the gap to the fill target within a few steps.
        let (mut model, _) = with_application_writes(dynamic(), MS);
        model.run(500 * MS, STEP, |_| {});
        assert!(model.rate_over(S) > 400 * MIB * 9 / 10);
        // With a delay target instead of a fill target, from one request.
        let config = RateControl {
            fill_target: 0,
            delay_target: 100 * MS,
            ..dynamic()
        };
        let mut model = Model::new(config, 400 * MIB, MS);
        model.run(S, STEP, |_| {});
        assert!(model.rate_over(S) > 400 * MIB * 9 / 10);
    }

    #[test]
    fn the_delay_target_sets_the_queue() {
        // The measured rate times the delay target: at 100 MiB/s and 200 ms, 20 MiB queued.
        let config = RateControl {
            fill_target: 0,
            delay_target: 200 * MS,
            ..dynamic()
        };
        let mut model = Model::new(config, 100 * MIB, MS);
        model.run(10 * S, STEP, |_| {});
        let mut samples = Vec::new();
        model.run(5 * S, STEP, |m| samples.push(m.in_flight));
        let average = samples.iter().sum::<u64>() / samples.len() as u64;
        assert!(
            average > 15 * MIB && average < 25 * MIB,
            "in flight {} MiB",
            average / MIB
        );
    }

    #[test]
    fn c_max_rate_bounds_every_moment() {
        let max_rate = 50 * MIB;
        let config = RateControl {
            max_rate,
            ..dynamic()
        };
        let mut model = Model::new(config, 400 * MIB, MS);
        model.run(6 * S, 7 * MS, |m| {
            let bound = u128::from(max_rate) * u128::from(m.elapsed()) / u128::from(S);
            assert!(
                u128::from(m.requested) <= bound + u128::from(REQUEST),
                "{} requested after {} ms",
                m.requested,
                m.elapsed() / MS
            );
        });
        let rate = model.rate_over(4 * S);
        assert!(rate > max_rate * 9 / 10 && rate <= max_rate, "{rate}");
        // The same with irregular ticks (the completions drive it too).
        let mut model = Model::new(
            RateControl {
                max_rate: 4 << 10,
                ..dynamic()
            },
            400 * MIB,
            MS,
        );
        model.run(10 * S, 330 * MS, |m| {
            assert!(
                m.requested <= 4096 * m.elapsed() / S + 4096,
                "{}",
                m.requested
            );
        });
        // A request every 4096 bytes' worth, seen at the next tick: 1.32 s apart.
        assert!(model.requested >= 7 * 4096, "{}", model.requested);
    }

    #[test]
    fn a_rate_limit_is_reached_with_single_block_requests() {
        // Scattered dirty blocks: every request is one block, far below a request's size.
        for config in [
            RateControl {
                plan_ahead: 0,
                fixed_rate: 2 * MIB,
                ..dynamic()
            },
            RateControl {
                max_rate: 2 * MIB,
                ..dynamic()
            },
        ] {
            let mut model = Model::new(config, 400 * MIB, MS);
            model.longest_run = BLOCK_SIZE;
            model.run(5 * S, STEP, |_| {});
            let rate = model.rate_over(4 * S);
            assert!(rate > 2 * MIB * 8 / 10 && rate <= 2 * MIB, "{rate}");
        }
    }

    #[test]
    fn plan_ahead_zero_applies_the_fixed_rate() {
        let fixed_rate = 20 * MIB;
        let config = RateControl {
            plan_ahead: 0,
            fixed_rate,
            // Not in force with the controller off.
            max_rate: MIB,
            ..dynamic()
        };
        let mut model = Model::new(config, 400 * MIB, MS);
        model.run(5 * S, STEP, |m| {
            let bound = fixed_rate * (m.elapsed() / MS) / 1000;
            assert!(m.requested <= bound + REQUEST, "{}", m.requested);
        });
        let rate = model.rate_over(5 * S);
        assert!(rate > fixed_rate * 9 / 10 && rate <= fixed_rate, "{rate}");
        assert_eq!(model.pacer.status().planned_rate, None);

        // No fixed rate: the window alone (the fill target) bounds what is in flight.
        let config = RateControl {
            plan_ahead: 0,
            fill_target: 2 * MIB,
            ..dynamic()
        };
        let mut model = Model::new(config, 400 * MIB, 10 * MS);
        model.run(3 * S, STEP, |_| {});
        assert!(model
            .log
            .iter()
            .all(|(_, in_flight, _)| *in_flight < 2 * MIB));
        assert!(model.rate_over(2 * S) > 150 * MIB);
    }

    /// Runs 3 s, then 3 s with an application write every 5 ms: the requests made meanwhile
    /// and the rate then.
    fn with_application_writes(
        config: RateControl,
        latency: Tick,
    ) -> (Model, Vec<(Tick, u64, u64)>) {
        let mut model = Model::new(config, 400 * MIB, latency);
        model.run(3 * S, STEP, |_| {});
        let from = model.log.len();
        let end = model.now + 3 * S;
        let mut next_write = model.now;
        while model.now < end {
            if model.now >= next_write {
                model.pacer.application_write(model.now);
                next_write += 5 * MS;
            }
            model.run(RESOLUTION, STEP, |_| {});
        }
        let during = model.log[from..].to_vec();
        (model, during)
    }

    #[test]
    fn application_writes_leave_one_request_in_flight_above_c_min_rate() {
        let (mut model, during) = with_application_writes(RateControl::default(), MS);
        assert!(!during.is_empty());
        // A request goes only when less than one is in flight.
        let over = during
            .iter()
            .filter(|(_, in_flight, _)| *in_flight >= REQUEST);
        assert_eq!(over.count(), 0);
        assert!(model.pacer.status().yielding);
        // Once the writes stop, the resync takes the link again.
        model.run(2 * S, STEP, |_| {});
        assert!(!model.pacer.status().yielding);
        assert!(model.rate_over(S) > 400 * MIB * 9 / 10);

        // One request at a time is slower than c_min_rate here: the resync does not yield
        // all the time, and keeps about c_min_rate.
        let config = RateControl {
            min_rate: 8 * MIB,
            ..RateControl::default()
        };
        let (model, during) = with_application_writes(config, 50 * MS);
        assert!(during.iter().any(|(_, in_flight, _)| *in_flight >= REQUEST));
        let moved: u64 = during.iter().map(|(_, _, len)| len).sum();
        assert!(moved / 3 >= 8 * MIB, "{} KiB/s", moved / 3 / 1024);
        assert!(model.pacer.measured_rate().is_some());
    }

    #[test]
    fn c_min_rate_zero_never_yields() {
        let config = RateControl {
            min_rate: 0,
            ..RateControl::default()
        };
        let (model, during) = with_application_writes(config, MS);
        assert!(!model.pacer.status().yielding);
        assert!(
            during
                .iter()
                .filter(|(_, in_flight, _)| *in_flight > 4 * MIB)
                .count()
                > 100,
            "the controller's queue stays"
        );
    }

    #[test]
    fn missed_ticks_do_not_burst() {
        let config = RateControl {
            max_rate: 0,
            ..dynamic()
        };
        for pause in [STEP + MS, S, 60 * S, 3_600 * S] {
            let mut model = Model::new(config.clone(), 400 * MIB, MS);
            model.run(5 * S, STEP, |_| {});
            // Nothing runs for a while (the answers arrive meanwhile, unseen), then they are
            // written at once and the target asks again.
            model.now += pause;
            let before = model.requested;
            model.complete();
            model.request();
            let burst = model.requested - before;
            // At most about two steps' worth at the rate the link had.
            assert!(
                burst <= 2 * 400 * MIB / 10 + 8 * MIB,
                "{} MiB after a pause of {} ms",
                burst / MIB,
                pause / MS
            );
            // And it carries on at the link's rate.
            assert!(model.rate_over(3 * S) > 400 * MIB * 9 / 10, "after {pause}");
        }
        // With c_max_rate, a pause earns no more than one step.
        let config = RateControl {
            max_rate: 10 * MIB,
            ..dynamic()
        };
        let mut model = Model::new(config, 400 * MIB, MS);
        model.run(3 * S, STEP, |_| {});
        model.now += 60 * S;
        let before = model.requested;
        model.complete();
        model.request();
        assert!(model.requested - before <= MIB + REQUEST);
    }

    #[test]
    fn a_resync_never_stalls() {
        // A budget that corrections drove to 0 still sends one request per step when nothing
        // is in flight; with a tiny fill target and a slow link, it moves.
        for config in [
            RateControl {
                fill_target: 4096,
                ..dynamic()
            },
            RateControl {
                fill_target: 0,
                delay_target: 100 * MS,
                ..dynamic()
            },
            RateControl {
                plan_ahead: 0,
                fixed_rate: 4096,
                ..dynamic()
            },
        ] {
            let mut model = Model::new(config.clone(), MIB, 200 * MS);
            model.run(10 * S, STEP, |_| {});
            assert!(model.settled >= 9 * 4096, "{config:?}: {}", model.settled);
        }
    }
}
