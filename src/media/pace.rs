//! The node's write clock: a few tasks take turns for every player, instead of a task and a
//! timer per player.
//!
//! A player costs the kernel about the same per write whatever the write's size, so a node
//! with many players merges each player's frames into one write per interval: the node's write
//! budget (`--write-budget` writes per second across all players) shared out among them, at
//! least [`MIN_INTERVAL`] and at most `--player-batch-ms`. Players are dealt out to [`PHASES`]
//! phase tasks; each phase task gives each of its players a [`Turn`] once per interval, the
//! phases spread over the interval. Waking a task per player per write cost as much CPU as the
//! player's own work in the runtime (waker registration, scheduling, a timer each); a phase
//! task does hundreds of turns per wake.
//!
//! Guarantees:
//! - A new player gets its first turn at once (its first frames are not held back), then one
//!   per interval.
//! - A turn that panics drops that player only; its phase and the other players go on.
//! - A phase task yields to the runtime every [`TURNS_PER_YIELD`] turns, so a phase with many
//!   players does not hold a worker thread for long.
//! - Phase tasks start on the first player they get, on the runtime of the caller, and wait
//!   without a timer when they have no players.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::error;

/// Phase tasks per node.
pub(crate) const PHASES: usize = 8;
/// The shortest interval between two turns of a player (a node with few players).
pub(crate) const MIN_INTERVAL: Duration = Duration::from_millis(5);
/// Turns a phase task takes before it lets other tasks run.
pub(crate) const TURNS_PER_YIELD: usize = 64;

/// A player's share of work each time its phase comes round.
pub(crate) trait Turn: Send + 'static {
    /// Does what is due now (read the client's input, write what is new); `false` when the
    /// player is finished, and is then dropped.
    fn turn(&mut self, now: Instant) -> bool;
}

/// Where a phase task gets its new players.
type PhaseInbox = mpsc::UnboundedSender<Box<dyn Turn>>;

/// The node-wide clock.
pub(crate) struct Pacer {
    phases: Box<[OnceLock<PhaseInbox>]>,
    next_phase: AtomicUsize,
    members: AtomicU64,
    /// Writes per second for all players together.
    budget: u64,
    /// The longest interval.
    cap: Duration,
}

impl Pacer {
    /// A clock that shares `budget` turns per second among its players, each getting one at
    /// least every `cap`.
    pub(crate) fn new(budget: u64, cap: Duration) -> Arc<Self> {
        Arc::new(Self {
            phases: (0..PHASES).map(|_| OnceLock::new()).collect(),
            next_phase: AtomicUsize::new(0),
            members: AtomicU64::new(0),
            budget: budget.max(1),
            cap: cap.max(MIN_INTERVAL),
        })
    }

    /// The interval between two turns of one player now.
    pub(crate) fn interval(&self) -> Duration {
        let per_player =
            Duration::from_secs_f64(self.members.load(Relaxed) as f64 / self.budget as f64);
        per_player.clamp(MIN_INTERVAL, self.cap)
    }

    /// Players being paced.
    #[cfg(test)]
    pub(crate) fn players(&self) -> u64 {
        self.members.load(Relaxed)
    }

    /// Hands `player` to a phase task, which gives it turns until it is finished. Must be called
    /// on a tokio runtime.
    pub(crate) fn adopt(self: &Arc<Self>, player: Box<dyn Turn>) {
        let phase = self.next_phase.fetch_add(1, Relaxed) % PHASES;
        let tx = self.phases[phase].get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(self.clone().run(rx));
            tx
        });
        self.members.fetch_add(1, Relaxed);
        if tx.send(player).is_err() {
            // The phase task is gone with the runtime it ran on: the player is dropped.
            self.members.fetch_sub(1, Relaxed);
            error!(phase, "player dropped: the write clock's task is gone");
        }
    }

    async fn run(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Box<dyn Turn>>) {
        let mut players: Vec<Box<dyn Turn>> = Vec::new();
        // Phases start with their first players, so they spread over the interval.
        let mut next = Instant::now();
        loop {
            if players.is_empty() {
                let Some(mut p) = rx.recv().await else {
                    return;
                };
                if self.first_turn(&mut p) {
                    players.push(p);
                }
                next = Instant::now() + self.interval();
                continue;
            }
            tokio::select! {
                biased;
                p = rx.recv() => {
                    let Some(mut p) = p else { return };
                    if self.first_turn(&mut p) {
                        players.push(p);
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            let now = Instant::now();
            let mut i = 0;
            let mut done = 0;
            while i < players.len() {
                if self.take_turn(&mut players[i], now) {
                    i += 1;
                } else {
                    players.swap_remove(i);
                }
                done += 1;
                if done % TURNS_PER_YIELD == 0 {
                    tokio::task::yield_now().await;
                }
            }
            next += self.interval();
            let now = Instant::now();
            if next < now {
                // Behind (a busy machine): the next round starts now rather than in a burst.
                next = now;
            }
        }
    }

    fn first_turn(&self, p: &mut Box<dyn Turn>) -> bool {
        self.take_turn(p, Instant::now())
    }

    /// One turn of one player; `false` when it finished (or panicked) and is to be dropped.
    fn take_turn(&self, p: &mut Box<dyn Turn>, now: Instant) -> bool {
        let alive = match std::panic::catch_unwind(AssertUnwindSafe(|| p.turn(now))) {
            Ok(alive) => alive,
            Err(_) => {
                error!("a player's turn panicked; that player is dropped");
                false
            }
        };
        if !alive {
            self.members.fetch_sub(1, Relaxed);
        }
        alive
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records the instants of its turns; finishes after `turns`.
    struct Probe {
        at: Arc<Mutex<Vec<Instant>>>,
        turns: usize,
        panic_at: Option<usize>,
    }

    impl Turn for Probe {
        fn turn(&mut self, now: Instant) -> bool {
            let n = {
                let mut at = self.at.lock().unwrap();
                at.push(now);
                at.len()
            };
            if Some(n) == self.panic_at {
                panic!("probe panics on purpose");
            }
            n < self.turns
        }
    }

    fn probe(turns: usize, panic_at: Option<usize>) -> (Box<dyn Turn>, Arc<Mutex<Vec<Instant>>>) {
        let at = Arc::new(Mutex::new(Vec::new()));
        let p = Probe {
            at: at.clone(),
            turns,
            panic_at,
        };
        (Box::new(p), at)
    }

    #[tokio::test(start_paused = true)]
    async fn a_player_gets_a_turn_at_once_then_one_per_interval() {
        // 1,000 players on a budget of 10,000 writes/s: 100 ms each.
        let pacer = Pacer::new(10_000, Duration::from_millis(100));
        let start = Instant::now();
        let mut probes = Vec::new();
        for _ in 0..1000 {
            let (p, at) = probe(4, None);
            pacer.adopt(p);
            probes.push(at);
        }
        assert_eq!(pacer.interval(), Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        for at in &probes {
            let at = at.lock().unwrap();
            assert_eq!(at.len(), 4, "each probe finishes after its 4 turns");
            assert!(
                at[0] - start < Duration::from_millis(1),
                "first turn at once"
            );
            for w in at[1..].windows(2) {
                assert_eq!(w[1] - w[0], Duration::from_millis(100));
            }
        }
        assert_eq!(pacer.players(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn few_players_get_short_intervals_and_a_panic_drops_one_player() {
        let pacer = Pacer::new(10_000, Duration::from_millis(100));
        let (p, at) = probe(usize::MAX, None);
        pacer.adopt(p);
        // Same phase as the first (PHASES players later), and panics on its second turn.
        for _ in 1..PHASES {
            pacer.adopt(probe(1, None).0);
        }
        let (bad, bad_at) = probe(usize::MAX, Some(2));
        pacer.adopt(bad);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = at.lock().unwrap().len();
        // Every MIN_INTERVAL for 100 ms, and the first at once.
        assert!((20..=21).contains(&n), "{n} turns");
        assert_eq!(bad_at.lock().unwrap().len(), 2);
        assert_eq!(pacer.players(), 1);
    }
}
