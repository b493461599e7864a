//! Transcode jobs: which broadcasts get an ABR ladder from a transcoder node, and which
//! transcoder makes it. Plain data and functions: the registry's nodes and the time are passed
//! in ([`Jobs::update`]); the embedded manager runs it after reports that change a publisher or
//! a ladder, and on every sweep.
//!
//! Guarantees:
//! - One job per broadcast, existing exactly while the broadcast is published on an origin that
//!   is not failed (a standalone node makes its own ladder) and it is wanted: the rule
//!   (`--transcode`: none, all, or a list of apps) matches its app, or a publish lookup marked it
//!   (`?transcode=true`). A mark lasts until the broadcast has been live and then not live for
//!   [`MARK_AFTER_LIVE`], or [`MARK_UNUSED`] when it never goes live; at most [`MAX_MARKS`].
//! - A job is assigned to at most one transcoder, live and not draining. An unassigned job
//!   whose origin already reports a usable transcoder publishing its ladder (after a manager
//!   restart) goes back to that one. Otherwise the most CPU headroom wins: `cores − cpu`, less
//!   [`JOB_CPU`] for every job the node's report may not show yet (not running yet, or given
//!   after its last report); nodes with room for one more job ([`JOB_CPU`]) before those
//!   without, in the origin's region before other regions, ties by id. With no room anywhere
//!   the job still goes to the best one: the autoscaler sees its CPU and adds transcoders.
//! - For [`Jobs::new`]'s `hold` after the manager starts, only such returns are made: the
//!   transcoders of a restarted manager register again first.
//! - A job is taken from its transcoder (and given to the best other one at once) when the
//!   transcoder is failed, draining or gone; when the origin showed that transcoder publishing
//!   the ladder and no longer does (a killed transcoder: the origin notices within its link's
//!   idle timeout and reports at once); or when the origin never showed it within
//!   [`START_GRACE`]. After the last two that transcoder is passed over for the job for
//!   [`AVOID_FOR`] while another can take it.
//! - A job whose broadcast moves to another origin keeps its transcoder, with a fresh start
//!   grace.
//! - Every node's job list has a version, changed exactly when the list changes (a job taken
//!   from its only transcoder and given back to it is no change). Versions come from
//!   one counter that only rises, started at [`Jobs::new`]'s seed (the manager passes the wall
//!   clock in µs): no version goes backwards, not when a node registers again, nor across a
//!   manager restart.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::registry::{NodeEntry, NodeStatus, Registry};
use super::{JobList, NodeRole, TranscodeJob};

/// How long a transcoder has to show up as the ladder's publisher on the origin.
pub(crate) const START_GRACE: Duration = Duration::from_secs(10);
/// How long a transcoder that lost a job, or never started it, is passed over for that job.
pub(crate) const AVOID_FOR: Duration = Duration::from_secs(60);
/// Cores one ladder is counted as until the transcoder's reports show it (the default ladder
/// of a 720p30 source needs 0.83 of a core: BENCHMARKS.md, "Transcoder ladder").
pub(crate) const JOB_CPU: f64 = 1.0;
/// How long a mark (`?transcode=true`) lasts once its broadcast is no longer live.
pub(crate) const MARK_AFTER_LIVE: Duration = Duration::from_secs(60);
/// How long a mark lasts when its broadcast never goes live.
pub(crate) const MARK_UNUSED: Duration = Duration::from_secs(600);
/// Most marks kept.
pub(crate) const MAX_MARKS: usize = 10_000;
/// Longest wait of a job list long poll.
pub(crate) const LONG_POLL: Duration = Duration::from_secs(10);

pub use crate::ladder::TranscodeRule;

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum JobState {
    /// No transcoder can take it now.
    Unassigned,
    /// Given to a transcoder; the origin does not show its ladder yet.
    Assigned,
    /// The origin reports the assigned transcoder publishing the ladder.
    Running,
}

impl JobState {
    /// Every state, for metrics.
    pub(crate) const ALL: [JobState; 3] =
        [JobState::Unassigned, JobState::Assigned, JobState::Running];

    /// Its name in the API and metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            JobState::Unassigned => "unassigned",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
        }
    }
}

/// Why a job was taken from its transcoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Taken {
    /// The transcoder missed its heartbeats.
    Failed,
    /// The transcoder is scaled in.
    Draining,
    /// The transcoder was removed.
    Gone,
    /// The origin no longer shows the transcoder publishing the ladder.
    Lost,
    /// The origin never showed it within [`START_GRACE`].
    NoStart,
}

impl Taken {
    /// Its metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Taken::Failed => "failed",
            Taken::Draining => "draining",
            Taken::Gone => "gone",
            Taken::Lost => "lost",
            Taken::NoStart => "no_start",
        }
    }
}

/// One broadcast's job.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Job {
    /// `app/key`.
    pub(crate) broadcast: String,
    /// The origin that has its publisher.
    pub(crate) origin: String,
    /// The transcoder making its ladder.
    pub(crate) transcoder: Option<String>,
    /// Where it stands.
    pub(crate) state: JobState,
    /// When it entered that state.
    pub(crate) since: Instant,
    /// When it was given to its transcoder (or its origin changed).
    assigned_at: Instant,
}

/// A `?transcode=true` mark.
#[derive(Clone, Copy, Debug)]
struct Mark {
    /// When it was (last) asked for.
    made: Instant,
    /// When its broadcast was last seen published on an origin.
    live_at: Option<Instant>,
}

/// The jobs, the marks and the job list versions.
#[derive(Debug)]
pub(crate) struct Jobs {
    rule: TranscodeRule,
    marks: HashMap<String, Mark>,
    jobs: BTreeMap<String, Job>,
    /// Node → its job list's version.
    versions: HashMap<String, u64>,
    /// The last version handed out.
    counter: u64,
    /// Broadcast → transcoders passed over for it, until when.
    avoid: HashMap<String, Vec<(String, Instant)>>,
    /// Only returns to a transcoder already publishing are made before this.
    hold_until: Instant,
    /// Jobs taken from a transcoder, by why.
    taken: BTreeMap<Taken, u64>,
}

/// What [`Jobs::update`] needs to know of a transcoder.
struct Candidate<'a> {
    node: &'a NodeEntry,
    /// Cores counted for jobs its report may not show yet.
    pending: f64,
}

impl Jobs {
    /// No jobs yet; versions start above `seed`; only returns to a transcoder already
    /// publishing are made until `now + hold`.
    pub(crate) fn new(rule: TranscodeRule, seed: u64, now: Instant, hold: Duration) -> Self {
        Self {
            rule,
            marks: HashMap::new(),
            jobs: BTreeMap::new(),
            versions: HashMap::new(),
            counter: seed,
            avoid: HashMap::new(),
            hold_until: now + hold,
            taken: BTreeMap::new(),
        }
    }

    /// Replaces the rule (taken at the next update).
    pub(crate) fn set_rule(&mut self, rule: TranscodeRule) {
        self.rule = rule;
    }

    /// Marks `broadcast` for a ladder (a publish lookup with `?transcode=true`); false when
    /// [`MAX_MARKS`] other marks are kept.
    pub(crate) fn mark(&mut self, broadcast: &str, now: Instant) -> bool {
        if let Some(m) = self.marks.get_mut(broadcast) {
            m.made = now;
            return true;
        }
        if self.marks.len() >= MAX_MARKS {
            return false;
        }
        self.marks.insert(
            broadcast.to_owned(),
            Mark {
                made: now,
                live_at: None,
            },
        );
        true
    }

    /// Every job, sorted by broadcast.
    pub(crate) fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// Jobs taken from a transcoder so far, by why.
    pub(crate) fn taken(&self) -> impl Iterator<Item = (Taken, u64)> + '_ {
        self.taken.iter().map(|(k, v)| (*k, *v))
    }

    /// Node `node`'s job list now (a node never seen before gets a version of its own).
    pub(crate) fn list(&mut self, node: &str) -> JobList {
        let counter = &mut self.counter;
        let version = *self.versions.entry(node.to_owned()).or_insert_with(|| {
            *counter += 1;
            *counter
        });
        let jobs = self
            .jobs
            .values()
            .filter(|j| j.transcoder.as_deref() == Some(node))
            .map(|j| TranscodeJob {
                broadcast: j.broadcast.clone(),
            })
            .collect();
        JobList { version, jobs }
    }

    /// Transcoder → its jobs' broadcasts.
    fn lists(&self) -> HashMap<String, BTreeSet<String>> {
        let mut lists: HashMap<String, BTreeSet<String>> = HashMap::new();
        for j in self.jobs.values() {
            if let Some(t) = &j.transcoder {
                lists
                    .entry(t.clone())
                    .or_default()
                    .insert(j.broadcast.clone());
            }
        }
        lists
    }

    /// Brings the jobs in line with the registry's nodes at `now` (swept: failed nodes marked);
    /// answers the nodes whose job list changed, with their new versions.
    pub(crate) fn update(&mut self, reg: &Registry, now: Instant) -> Vec<(String, u64)> {
        let ttl = reg.ttl();
        let up = |n: &NodeEntry| {
            n.status == NodeStatus::Live && now.saturating_duration_since(n.last_seen) <= ttl
        };
        // The wanted broadcasts: published on an origin that is up, matching the rule or marked.
        let mut wanted: BTreeMap<&str, (&NodeEntry, Option<&str>)> = BTreeMap::new();
        for n in reg.nodes() {
            if n.info.role != NodeRole::Origin || !up(n) {
                continue;
            }
            for b in n.load.broadcasts.iter().filter(|b| b.publishing) {
                let marked = match self.marks.get_mut(&b.name) {
                    Some(m) => {
                        m.live_at = Some(now);
                        true
                    }
                    None => false,
                };
                if marked || self.rule.matches(&b.name) {
                    wanted
                        .entry(&b.name)
                        .or_insert((n, b.ladder_from.as_deref()));
                }
            }
        }
        self.marks.retain(|_, m| match m.live_at {
            Some(t) => now.saturating_duration_since(t) <= MARK_AFTER_LIVE,
            None => now.saturating_duration_since(m.made) <= MARK_UNUSED,
        });
        self.avoid.retain(|_, v| {
            v.retain(|(_, until)| *until > now);
            !v.is_empty()
        });
        let mut changed: HashSet<String> = HashSet::new();
        // Who had which jobs, to tell a changed list from one taken and given back.
        let before = self.lists();
        // Jobs whose broadcast is no longer wanted go.
        self.jobs.retain(|name, job| {
            let keep = wanted.contains_key(name.as_str());
            if !keep && let Some(t) = job.transcoder.take() {
                changed.insert(t);
            }
            keep
        });
        // Jobs whose transcoder is gone, failed, draining, lost the ladder or never started it
        // are taken from it.
        for (name, job) in &mut self.jobs {
            let (origin, ladder_from) = wanted[name.as_str()];
            if job.origin != origin.info.id {
                job.origin = origin.info.id.clone();
                job.assigned_at = now;
                if job.state == JobState::Running {
                    job.state = JobState::Assigned;
                    job.since = now;
                }
            }
            let Some(t) = job.transcoder.as_deref() else {
                continue;
            };
            let why = match reg.node(t) {
                None => Some(Taken::Gone),
                Some(n) if !up(n) => Some(Taken::Failed),
                Some(n) if n.draining.is_some() => Some(Taken::Draining),
                Some(_) if ladder_from == Some(t) => {
                    if job.state != JobState::Running {
                        job.state = JobState::Running;
                        job.since = now;
                    }
                    None
                }
                Some(_) if job.state == JobState::Running => Some(Taken::Lost),
                Some(_) if now.saturating_duration_since(job.assigned_at) > START_GRACE => {
                    Some(Taken::NoStart)
                }
                Some(_) => None,
            };
            if let Some(why) = why {
                let t = job.transcoder.take().expect("checked above");
                *self.taken.entry(why).or_default() += 1;
                if matches!(why, Taken::Lost | Taken::NoStart) {
                    self.avoid
                        .entry(name.clone())
                        .or_default()
                        .push((t.clone(), now + AVOID_FOR));
                }
                job.state = JobState::Unassigned;
                job.since = now;
                changed.insert(t);
            }
        }
        // The transcoders that may take jobs, with what their reports may not show yet.
        let mut candidates: Vec<Candidate<'_>> = reg
            .nodes()
            .into_iter()
            .filter(|n| n.info.role == NodeRole::Transcoder && n.placeable() && up(n))
            .map(|node| Candidate { node, pending: 0.0 })
            .collect();
        for job in self.jobs.values() {
            let Some(t) = job.transcoder.as_deref() else {
                continue;
            };
            if let Some(c) = candidates.iter_mut().find(|c| c.node.info.id == t)
                && (job.state == JobState::Assigned || job.assigned_at > c.node.last_seen)
            {
                c.pending += JOB_CPU;
            }
        }
        // Unassigned and new jobs get one.
        for (&name, &(origin, ladder_from)) in &wanted {
            let job = self.jobs.entry(name.to_owned()).or_insert_with(|| Job {
                broadcast: name.to_owned(),
                origin: origin.info.id.clone(),
                transcoder: None,
                state: JobState::Unassigned,
                since: now,
                assigned_at: now,
            });
            if job.transcoder.is_some() {
                continue;
            }
            let back =
                ladder_from.and_then(|x| candidates.iter().position(|c| c.node.info.id == x));
            let at = match back {
                Some(i) => Some(i),
                None if now < self.hold_until => None,
                None => {
                    let avoided = self.avoid.get(name);
                    best(&candidates, &origin.info.region, avoided, now)
                }
            };
            let Some(i) = at else {
                continue;
            };
            let id = candidates[i].node.info.id.clone();
            job.state = if back.is_some() {
                JobState::Running
            } else {
                candidates[i].pending += JOB_CPU;
                JobState::Assigned
            };
            job.since = now;
            job.assigned_at = now;
            job.transcoder = Some(id.clone());
            changed.insert(id);
        }
        // Versions: the changed lists get new ones; forgotten nodes' go (a node seen again
        // gets a fresh one, above every earlier one).
        self.versions.retain(|id, _| reg.node(id).is_some());
        let after = self.lists();
        let mut changed: Vec<String> = changed
            .into_iter()
            .filter(|id| reg.node(id).is_some() && before.get(id) != after.get(id))
            .collect();
        changed.sort();
        changed
            .into_iter()
            .map(|id| {
                self.counter += 1;
                self.versions.insert(id.clone(), self.counter);
                (id, self.counter)
            })
            .collect()
    }
}

/// The index of the transcoder for a job of an origin in `region`: not passed over for it
/// first, then with room for it, then in the region, then most headroom, then by id.
fn best(
    candidates: &[Candidate<'_>],
    region: &str,
    avoided: Option<&Vec<(String, Instant)>>,
    now: Instant,
) -> Option<usize> {
    let key = |c: &Candidate<'_>| {
        let id = c.node.info.id.as_str();
        let passed_over =
            avoided.is_some_and(|v| v.iter().any(|(x, until)| x == id && *until > now));
        let headroom = c.node.load.cores - c.node.load.cpu - c.pending;
        (
            passed_over,
            headroom < JOB_CPU,
            c.node.info.region != region,
            -headroom,
        )
    };
    (0..candidates.len()).min_by(|&a, &b| {
        let (ka, kb) = (key(&candidates[a]), key(&candidates[b]));
        (ka.0, ka.1, ka.2)
            .cmp(&(kb.0, kb.1, kb.2))
            .then(ka.3.total_cmp(&kb.3))
            .then_with(|| candidates[a].node.info.id.cmp(&candidates[b].node.info.id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::{BroadcastLoad, LoadReport, NodeAddresses, NodeInfo};

    const TTL: Duration = Duration::from_secs(3);

    fn info(id: &str, role: NodeRole, region: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            role,
            region: region.into(),
            addresses: NodeAddresses {
                rtmp: None,
                http: format!("http://{id}"),
                cluster: Some(format!("{id}:4443")),
            },
            capacity: 100,
            group: None,
        }
    }

    /// An origin's report: its published broadcasts, each with the node publishing its ladder.
    fn published(broadcasts: &[(&str, Option<&str>)]) -> LoadReport {
        LoadReport {
            broadcasts: broadcasts
                .iter()
                .map(|(name, from)| BroadcastLoad {
                    name: (*name).into(),
                    publishing: true,
                    ladder_from: from.map(str::to_owned),
                    ..BroadcastLoad::default()
                })
                .collect(),
            ..LoadReport::default()
        }
    }

    /// A transcoder's report.
    fn busy(cores: f64, cpu: f64) -> LoadReport {
        LoadReport {
            cores,
            cpu,
            ..LoadReport::default()
        }
    }

    /// Origins a and b (regions a and b), transcoders t-a1, t-a2 (region a) and t-b1 (b).
    fn cluster(now: Instant) -> Registry {
        let mut r = Registry::new(TTL, "a");
        r.register(info("origin-a", NodeRole::Origin, "a"), now);
        r.register(info("origin-b", NodeRole::Origin, "b"), now);
        r.register(info("solo", NodeRole::Standalone, "a"), now);
        for (id, region, cores) in [("t-a1", "a", 8.0), ("t-a2", "a", 8.0), ("t-b1", "b", 16.0)] {
            r.register(info(id, NodeRole::Transcoder, region), now);
            r.report(id, busy(cores, 0.0), now).unwrap();
        }
        r
    }

    fn jobs(rule: TranscodeRule, now: Instant) -> Jobs {
        Jobs::new(rule, 1000, now, Duration::ZERO)
    }

    /// Broadcast → (transcoder, state).
    fn table(j: &Jobs) -> BTreeMap<String, (Option<String>, JobState)> {
        j.jobs()
            .map(|j| (j.broadcast.clone(), (j.transcoder.clone(), j.state)))
            .collect()
    }

    fn on(t: &str, state: JobState) -> (Option<String>, JobState) {
        (Some(t.to_owned()), state)
    }

    fn names(list: &JobList) -> Vec<&str> {
        list.jobs.iter().map(|j| j.broadcast.as_str()).collect()
    }

    #[test]
    fn rules_parse_and_match() {
        assert_eq!(TranscodeRule::parse("none"), Ok(TranscodeRule::None));
        assert_eq!(TranscodeRule::parse("all"), Ok(TranscodeRule::All));
        let apps = TranscodeRule::parse("live,events").unwrap();
        assert!(apps.matches("live/x") && apps.matches("events/y"));
        assert!(!apps.matches("other/x") && !apps.matches("live") && !apps.matches("liv/x"));
        assert!(TranscodeRule::All.matches("any/thing"));
        assert!(!TranscodeRule::None.matches("live/x"));
        for bad in ["", " ", "live,", "live/x", "a b", "ok,é"] {
            assert!(TranscodeRule::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn jobs_are_the_origins_broadcasts_the_rule_or_a_mark_wants() {
        let t0 = Instant::now();
        let mut r = cluster(t0);
        let mut j = jobs(TranscodeRule::parse("live").unwrap(), t0);
        r.report(
            "origin-a",
            published(&[("live/x", None), ("events/y", None)]),
            t0,
        )
        .unwrap();
        // A standalone node makes its own ladder: never a job.
        r.report("solo", published(&[("live/solo", None)]), t0)
            .unwrap();
        j.update(&r, t0);
        assert_eq!(
            j.jobs().map(|j| &j.broadcast[..]).collect::<Vec<_>>(),
            ["live/x"]
        );
        assert_eq!(j.jobs().next().unwrap().origin, "origin-a");
        // A publish lookup with ?transcode=true marks events/y: it gets one too.
        assert!(j.mark("events/y", t0));
        j.update(&r, t0);
        assert_eq!(table(&j).len(), 2);
        // Unpublished: its job goes; the mark stays a while, so a reconnect gets one again.
        let t1 = t0 + Duration::from_secs(5);
        for id in ["t-a1", "t-a2", "t-b1"] {
            r.report(id, busy(8.0, 0.0), t1).unwrap();
        }
        r.report("origin-a", published(&[("live/x", None)]), t1)
            .unwrap();
        j.update(&r, t1);
        assert_eq!(table(&j).len(), 1);
        let t2 = t1 + MARK_AFTER_LIVE - Duration::from_secs(1);
        for id in ["t-a1", "t-a2", "t-b1"] {
            r.report(id, busy(8.0, 0.0), t2).unwrap();
        }
        r.report(
            "origin-a",
            published(&[("live/x", None), ("events/y", None)]),
            t2,
        )
        .unwrap();
        j.update(&r, t2);
        assert!(table(&j).contains_key("events/y"));
        // Gone for longer than MARK_AFTER_LIVE: the mark is forgotten.
        let t3 = t2 + Duration::from_secs(1);
        r.report("origin-a", published(&[("live/x", None)]), t3)
            .unwrap();
        j.update(&r, t3);
        let t4 = t3 + MARK_AFTER_LIVE + Duration::from_secs(1);
        for id in ["origin-a", "t-a1", "t-a2", "t-b1"] {
            let load = if id == "origin-a" {
                published(&[("live/x", None)])
            } else {
                busy(8.0, 0.0)
            };
            r.report(id, load, t4).unwrap();
        }
        j.update(&r, t4);
        r.report(
            "origin-a",
            published(&[("live/x", None), ("events/y", None)]),
            t4,
        )
        .unwrap();
        j.update(&r, t4);
        assert!(!table(&j).contains_key("events/y"));
        // A mark that never goes live lasts MARK_UNUSED.
        assert!(j.mark("events/later", t4));
        j.update(&r, t4 + MARK_UNUSED);
        assert!(j.marks.contains_key("events/later"));
        j.update(&r, t4 + MARK_UNUSED + Duration::from_secs(1));
        assert!(!j.marks.contains_key("events/later"));
        // A failed origin's broadcasts have no job.
        let t5 = t4 + TTL + Duration::from_secs(1);
        r.sweep(t5);
        j.update(&r, t5);
        assert!(table(&j).is_empty());
    }

    #[test]
    fn marks_are_bounded() {
        let t0 = Instant::now();
        let mut j = jobs(TranscodeRule::None, t0);
        for i in 0..MAX_MARKS {
            assert!(j.mark(&format!("live/{i}"), t0));
        }
        assert!(!j.mark("live/one-more", t0));
        // Asking again for a marked one is fine.
        assert!(j.mark("live/7", t0));
    }

    #[test]
    fn placement_takes_headroom_room_and_region_and_counts_what_reports_miss() {
        let t0 = Instant::now();
        let mut r = cluster(t0);
        // t-a1: 2.5 cores free, t-a2: 2.0, t-b1 (other region): 16.
        r.report("t-a1", busy(4.0, 1.5), t0).unwrap();
        r.report("t-a2", busy(4.0, 2.0), t0).unwrap();
        let mut j = jobs(TranscodeRule::All, t0);
        let mut live = Vec::new();
        let mut placed = Vec::new();
        for i in 0..5 {
            live.push(format!("live/{i}"));
            let b: Vec<(&str, Option<&str>)> = live.iter().map(|n| (n.as_str(), None)).collect();
            r.report("origin-a", published(&b), t0).unwrap();
            j.update(&r, t0);
            placed.push(table(&j)[&live[i]].0.clone().unwrap());
        }
        // 2.5 → t-a1; 1.5 vs 2.0 → t-a2; 1.5 vs 1.0 → t-a1; 0.5 vs 1.0 → t-a2 (room for one
        // more); then region a has no room: region b.
        assert_eq!(placed, ["t-a1", "t-a2", "t-a1", "t-a2", "t-b1"]);
        assert_eq!(names(&j.list("t-a1")), ["live/0", "live/2"]);
        assert_eq!(names(&j.list("t-b1")), ["live/4"]);
        assert!(j.list("origin-a").jobs.is_empty());
        // With no room anywhere a job still goes to the most headroom, region first.
        r.report("t-b1", busy(1.0, 0.9), t0).unwrap();
        live.push("live/5".into());
        let b: Vec<(&str, Option<&str>)> = live.iter().map(|n| (n.as_str(), None)).collect();
        r.report("origin-a", published(&b), t0).unwrap();
        j.update(&r, t0);
        assert_eq!(table(&j)["live/5"].0.as_deref(), Some("t-a1"));
        // An origin in region b: its job goes to region b's transcoder while it has room.
        r.report("t-b1", busy(16.0, 0.0), t0).unwrap();
        r.report("origin-b", published(&[("live/b", None)]), t0)
            .unwrap();
        j.update(&r, t0);
        assert_eq!(table(&j)["live/b"], on("t-b1", JobState::Assigned));
    }

    #[test]
    fn a_killed_transcoder_loses_its_job_as_soon_as_the_origin_says_so() {
        let t0 = Instant::now();
        let mut r = cluster(t0);
        r.report("t-a2", busy(8.0, 1.0), t0).unwrap();
        let mut j = jobs(TranscodeRule::All, t0);
        r.report("origin-a", published(&[("live/x", None)]), t0)
            .unwrap();
        j.update(&r, t0);
        assert_eq!(table(&j)["live/x"], on("t-a1", JobState::Assigned));
        let v1 = j.list("t-a1").version;
        let t1 = t0 + Duration::from_secs(2);
        r.report("origin-a", published(&[("live/x", Some("t-a1"))]), t1)
            .unwrap();
        assert_eq!(j.update(&r, t1), []);
        assert_eq!(table(&j)["live/x"], on("t-a1", JobState::Running));
        // kill -9: the origin's link times out and it reports at once; t-a1 itself still looks
        // live (its TTL has not passed). The job moves now, to t-a2, and t-a1 is passed over.
        let t2 = t1 + Duration::from_millis(800);
        r.report("origin-a", published(&[("live/x", None)]), t2)
            .unwrap();
        let changed = j.update(&r, t2);
        assert_eq!(
            changed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["t-a1", "t-a2"]
        );
        assert_eq!(table(&j)["live/x"], on("t-a2", JobState::Assigned));
        let after = j.list("t-a1");
        assert!(after.jobs.is_empty() && after.version > v1);
        assert_eq!(j.taken().collect::<Vec<_>>(), [(Taken::Lost, 1)]);
        // t-a2 never starts it either: after the grace it goes to t-b1 (t-a1 is passed over
        // though it has more headroom in the origin's region).
        let t3 = t2 + START_GRACE + Duration::from_millis(100);
        for id in ["t-a1", "t-a2", "t-b1"] {
            r.report(id, busy(8.0, 0.0), t3).unwrap();
        }
        r.report("origin-a", published(&[("live/x", None)]), t3)
            .unwrap();
        j.update(&r, t3);
        assert_eq!(table(&j)["live/x"], on("t-b1", JobState::Assigned));
        assert_eq!(
            j.taken().collect::<Vec<_>>(),
            [(Taken::Lost, 1), (Taken::NoStart, 1)]
        );
        // Once the time to pass them over is up, t-a1 is a candidate again.
        let t4 = t2 + AVOID_FOR + Duration::from_secs(1);
        for id in ["t-a1", "t-a2", "t-b1"] {
            r.report(id, busy(8.0, 0.0), t4).unwrap();
        }
        r.report("origin-a", published(&[("live/x", None)]), t4)
            .unwrap();
        j.update(&r, t4);
        assert_eq!(table(&j)["live/x"], on("t-a1", JobState::Assigned));
    }

    #[test]
    fn failed_draining_and_removed_transcoders_lose_their_jobs() {
        let t0 = Instant::now();
        let mut r = cluster(t0);
        let mut j = jobs(TranscodeRule::All, t0);
        r.report("t-a2", busy(8.0, 1.0), t0).unwrap();
        r.report("t-b1", busy(16.0, 14.0), t0).unwrap();
        r.report("origin-a", published(&[("live/x", Some("t-a1"))]), t0)
            .unwrap();
        j.update(&r, t0);
        // An origin already showing a transcoder's ladder keeps it: running at once.
        assert_eq!(table(&j)["live/x"], on("t-a1", JobState::Running));
        // t-a1 stops reporting: failed after the TTL, and its job moves.
        let t1 = t0 + TTL + Duration::from_millis(100);
        for id in ["t-a2", "t-b1"] {
            r.report(id, busy(8.0, 1.0), t1).unwrap();
        }
        r.report("origin-a", published(&[("live/x", Some("t-a1"))]), t1)
            .unwrap();
        r.sweep(t1);
        j.update(&r, t1);
        assert_eq!(table(&j)["live/x"], on("t-a2", JobState::Assigned));
        // Drained: moves again.
        r.drain("t-a2", t1 + Duration::from_secs(60));
        j.update(&r, t1);
        assert_eq!(table(&j)["live/x"], on("t-b1", JobState::Assigned));
        assert!(j.list("t-a2").jobs.is_empty());
        // Removed: nowhere left to go (t-a1 failed, t-a2 draining).
        r.forget("t-b1");
        j.update(&r, t1);
        assert_eq!(table(&j)["live/x"], (None, JobState::Unassigned));
        assert_eq!(
            j.taken().collect::<Vec<_>>(),
            [(Taken::Failed, 1), (Taken::Draining, 1), (Taken::Gone, 1)]
        );
        // t-a1 reports again: the job goes to it, running at once while the origin still shows
        // its ladder.
        let t2 = t1 + Duration::from_secs(1);
        r.report("t-a1", busy(8.0, 0.0), t2).unwrap();
        j.update(&r, t2);
        assert_eq!(table(&j)["live/x"], on("t-a1", JobState::Running));
    }

    #[test]
    fn a_broadcast_that_moves_origin_keeps_its_transcoder_with_a_fresh_grace() {
        let t0 = Instant::now();
        let mut r = cluster(t0);
        let mut j = jobs(TranscodeRule::All, t0);
        r.report("origin-a", published(&[("live/x", Some("t-a1"))]), t0)
            .unwrap();
        j.update(&r, t0);
        let t1 = t0 + Duration::from_secs(8);
        for id in ["t-a1", "t-a2", "t-b1"] {
            r.report(id, busy(8.0, 0.0), t1).unwrap();
        }
        r.report("origin-a", LoadReport::default(), t1).unwrap();
        r.report("origin-b", published(&[("live/x", None)]), t1)
            .unwrap();
        assert_eq!(j.update(&r, t1), []);
        let job = j.jobs().next().unwrap();
        assert_eq!(
            (job.origin.as_str(), job.state),
            ("origin-b", JobState::Assigned)
        );
        assert_eq!(job.transcoder.as_deref(), Some("t-a1"));
        // Not taken at t0 + START_GRACE: the grace runs from the move.
        let t2 = t0 + START_GRACE + Duration::from_secs(1);
        for id in ["origin-b", "t-a1", "t-a2", "t-b1"] {
            let load = if id == "origin-b" {
                published(&[("live/x", None)])
            } else {
                busy(8.0, 0.0)
            };
            r.report(id, load, t2).unwrap();
        }
        j.update(&r, t2);
        assert_eq!(table(&j)["live/x"], on("t-a1", JobState::Assigned));
    }

    #[test]
    fn versions_change_with_the_list_and_never_go_back() {
        let t0 = Instant::now();
        let mut r = cluster(t0);
        let mut j = jobs(TranscodeRule::All, t0);
        let v0 = j.list("t-a1").version;
        assert!(v0 > 1000);
        // No change, no new version.
        assert_eq!(j.update(&r, t0), []);
        assert_eq!(j.list("t-a1").version, v0);
        r.report("origin-a", published(&[("live/x", None)]), t0)
            .unwrap();
        let changed = j.update(&r, t0);
        let v1 = j.list("t-a1").version;
        assert_eq!(changed, [("t-a1".to_owned(), v1)]);
        assert!(v1 > v0);
        // Registering again keeps the list and its version.
        r.register(info("t-a1", NodeRole::Transcoder, "a"), t0);
        r.report("t-a1", busy(8.0, 0.0), t0).unwrap();
        j.update(&r, t0);
        assert_eq!(j.list("t-a1").version, v1);
        // Forgotten, then back: a version above every earlier one.
        r.forget("t-a1");
        j.update(&r, t0);
        let moved = j.list("t-a2");
        assert_eq!(names(&moved), ["live/x"]);
        r.register(info("t-a1", NodeRole::Transcoder, "a"), t0);
        j.update(&r, t0);
        let back = j.list("t-a1");
        assert!(back.jobs.is_empty() && back.version > moved.version);
        // The broadcast ends: t-a2's list changes too.
        r.report("origin-a", LoadReport::default(), t0).unwrap();
        j.update(&r, t0);
        let ended = j.list("t-a2");
        assert!(ended.jobs.is_empty() && ended.version > back.version);
        // A manager started later (seeded by the wall clock) starts above.
        assert!(
            Jobs::new(TranscodeRule::All, ended.version, t0, TTL)
                .list("t-a2")
                .version
                > ended.version
        );
    }

    #[test]
    fn a_job_given_back_to_its_only_transcoder_changes_no_version() {
        let t0 = Instant::now();
        let mut r = Registry::new(TTL, "a");
        r.register(info("origin-a", NodeRole::Origin, "a"), t0);
        r.register(info("t", NodeRole::Transcoder, "a"), t0);
        let mut j = jobs(TranscodeRule::All, t0);
        r.report("origin-a", published(&[("live/x", None)]), t0)
            .unwrap();
        assert_eq!(j.update(&r, t0).len(), 1);
        let v = j.list("t").version;
        // Never started: taken after the grace, and given back to t, the only one.
        let t1 = t0 + START_GRACE + Duration::from_secs(1);
        r.report("origin-a", published(&[("live/x", None)]), t1)
            .unwrap();
        r.report("t", busy(8.0, 0.0), t1).unwrap();
        assert_eq!(j.update(&r, t1), []);
        assert_eq!(table(&j)["live/x"], on("t", JobState::Assigned));
        assert_eq!(j.taken().collect::<Vec<_>>(), [(Taken::NoStart, 1)]);
        assert_eq!(j.list("t").version, v);
    }

    #[test]
    fn a_restarted_manager_gives_jobs_back_first() {
        let t0 = Instant::now();
        let mut r = cluster(t0);
        r.report("t-a1", busy(8.0, 0.0), t0).unwrap();
        r.report("t-a2", busy(8.0, 6.0), t0).unwrap();
        let mut j = Jobs::new(TranscodeRule::All, 1, t0, TTL);
        r.report(
            "origin-a",
            published(&[("live/x", Some("t-a2")), ("live/y", None)]),
            t0,
        )
        .unwrap();
        j.update(&r, t0);
        // live/x goes back to t-a2 (though t-a1 has more headroom); live/y waits for the hold.
        assert_eq!(table(&j)["live/x"], on("t-a2", JobState::Running));
        assert_eq!(table(&j)["live/y"], (None, JobState::Unassigned));
        let t1 = t0 + TTL;
        for id in ["t-a1", "t-a2", "t-b1"] {
            r.report(id, busy(8.0, 0.0), t1).unwrap();
        }
        r.report(
            "origin-a",
            published(&[("live/x", Some("t-a2")), ("live/y", None)]),
            t1,
        )
        .unwrap();
        j.update(&r, t1);
        assert_eq!(table(&j)["live/y"].1, JobState::Assigned);
    }
}
