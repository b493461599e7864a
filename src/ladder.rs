//! ABR ladders: the renditions a transcoder makes of one source (size, frame rate, bitrate and
//! H.264 profile per rung), the built-in default ladder, named ladders from the configuration
//! file, how a ladder fits a given source ([`Ladder::for_source`]), and which broadcasts of a
//! cluster get one from a transcoder ([`TranscodeRule`], the stream manager's `--transcode`).
//!
//! Guarantees: a [`Ladder`] that exists passed [`Ladder::new`]'s checks (at least one rung; every
//! rung named, names unique; heights even and in 2..=[`MAX_HEIGHT`]; bitrates above zero; frame
//! rates in 1..=[`MAX_FPS`]; `auto` and `source` are not rung names), and an error names the
//! ladder and the rung. [`Ladder::for_source`]
//! never upscales, keeps the source's aspect ratio (the rung's height applies, the width follows,
//! rounded to even) and always yields at least one rung. No FFmpeg here: the encoder that builds
//! the renditions is [`crate::ffmpeg::ladder`].

use std::collections::{BTreeSet, HashSet};
use std::fmt;

use serde::Deserialize;

/// The name of the built-in ladder ([`Ladder::default_ladder`]); a `[ladders.default]` table in
/// the configuration file replaces it.
pub const DEFAULT_LADDER: &str = "default";
/// The tallest rung accepted (H.264 level 6.2 tops out at 8192×4320).
pub const MAX_HEIGHT: u32 = 4320;
/// The highest frame rate a rung may ask for.
pub const MAX_FPS: u32 = 240;

/// The H.264 profiles a rung may ask for (what libx264's `profile` option takes for 8-bit 4:2:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    /// Constrained baseline (x264's `baseline`: no B-frames, no CABAC): every decoder, WebRTC's
    /// mandatory profile.
    Baseline,
    /// Main: CABAC.
    Main,
    /// High: CABAC and 8×8 transforms.
    High,
}

impl Profile {
    /// The name as in the configuration and as libx264's `profile` option takes it.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Baseline => "baseline",
            Profile::Main => "main",
            Profile::High => "high",
        }
    }

    /// The profile named `s` (`baseline`, `main`, `high`).
    pub fn parse(s: &str) -> Option<Profile> {
        [Profile::Baseline, Profile::Main, Profile::High]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One rendition of a ladder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rung {
    /// Its name, unique in the ladder (`720p`).
    pub name: String,
    /// Width in pixels. In a [`Ladder`], the width for a 16:9 source (the height's 16:9 width,
    /// rounded to even); in what [`Ladder::for_source`] returns, the width made.
    pub width: u32,
    /// Height in pixels, even.
    pub height: u32,
    /// The most frames a second (frames are dropped from faster sources, keyframes never);
    /// `None`: the source's rate.
    pub fps: Option<u32>,
    /// Target bitrate, kbit/s (also the encoder's VBV maximum rate).
    pub bitrate_kbps: u32,
    /// The H.264 profile.
    pub profile: Profile,
}

impl Rung {
    /// A rung `height` pixels tall, as wide as 16:9 makes it.
    pub fn new(
        name: &str,
        height: u32,
        fps: Option<u32>,
        bitrate_kbps: u32,
        profile: Profile,
    ) -> Rung {
        Rung {
            name: name.to_owned(),
            width: even_round(u64::from(height) * 16, 9),
            height,
            fps,
            bitrate_kbps,
            profile,
        }
    }
}

/// A named list of rungs, tallest first as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ladder {
    /// The ladder's name.
    pub name: String,
    /// Its rungs, in the configured order.
    pub rungs: Vec<Rung>,
}

/// What is wrong with one rung.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RungProblem {
    /// No name, or one that is not 1 to 32 letters, digits, `.`, `_` or `-`.
    #[error("a rung's name is 1 to 32 letters, digits, '.', '_' or '-'")]
    BadName,
    /// Two rungs with this name.
    #[error("two rungs have this name")]
    Duplicate,
    /// `auto` or `source`: players ask for those with `?rendition=` (ABR, the source).
    #[error("'auto' and 'source' are not rung names: players ask for ABR and the source with them")]
    Reserved,
    /// A zero height or width.
    #[error("zero size")]
    ZeroSize,
    /// An odd height or width (4:2:0 pictures have even sizes).
    #[error("odd size {0} (4:2:0 video needs even sizes)")]
    OddSize(u32),
    /// Taller than [`MAX_HEIGHT`].
    #[error("height {0} is over {MAX_HEIGHT}")]
    TooTall(u32),
    /// A zero bitrate.
    #[error("zero bitrate")]
    ZeroBitrate,
    /// A frame rate outside 1..=[`MAX_FPS`].
    #[error("fps {0} is outside 1..={MAX_FPS}")]
    BadFps(u32),
    /// A profile not in [`Profile`].
    #[error("unknown profile {0:?} (baseline, main or high)")]
    UnknownProfile(String),
}

/// A ladder that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LadderError {
    /// The ladder's own name is not usable.
    #[error("ladder {0:?}: a ladder's name is 1 to 32 letters, digits, '.', '_' or '-'")]
    BadName(String),
    /// The ladder has no rungs.
    #[error("ladder {0:?} has no rungs")]
    Empty(String),
    /// One of its rungs is bad.
    #[error("ladder {ladder:?}, rung {rung}: {problem}")]
    Rung {
        /// The ladder.
        ladder: String,
        /// The rung: its name quoted, or `#N` (from 1) when it has no usable name.
        rung: String,
        /// What is wrong.
        problem: RungProblem,
    },
}

/// A ladder's or rung's name: 1 to 32 ASCII letters, digits, `.`, `_` or `-` (it names
/// renditions in URLs, `?rendition=NAME`, where nothing needs escaping, and in metrics labels).
fn name_ok(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `num / den` rounded to the nearest even number, at least 2.
fn even_round(num: u64, den: u64) -> u32 {
    let halves = (num + den) / (2 * den);
    (halves * 2).clamp(2, u64::from(u32::MAX - 1)) as u32
}

fn check_rung(r: &Rung) -> Result<(), RungProblem> {
    if !name_ok(&r.name) {
        return Err(RungProblem::BadName);
    }
    if matches!(r.name.as_str(), "auto" | "source") {
        return Err(RungProblem::Reserved);
    }
    for size in [r.width, r.height] {
        if size == 0 {
            return Err(RungProblem::ZeroSize);
        }
        if size % 2 == 1 {
            return Err(RungProblem::OddSize(size));
        }
    }
    if r.height > MAX_HEIGHT {
        return Err(RungProblem::TooTall(r.height));
    }
    if r.bitrate_kbps == 0 {
        return Err(RungProblem::ZeroBitrate);
    }
    if let Some(f) = r.fps.filter(|f| !(1..=MAX_FPS).contains(f)) {
        return Err(RungProblem::BadFps(f));
    }
    Ok(())
}

impl Ladder {
    /// A checked ladder.
    pub fn new(name: &str, rungs: Vec<Rung>) -> Result<Ladder, LadderError> {
        if !name_ok(name) {
            return Err(LadderError::BadName(name.to_owned()));
        }
        if rungs.is_empty() {
            return Err(LadderError::Empty(name.to_owned()));
        }
        let mut names = HashSet::new();
        for (i, r) in rungs.iter().enumerate() {
            let problem = match check_rung(r) {
                Err(p) => Some(p),
                Ok(()) if !names.insert(r.name.as_str()) => Some(RungProblem::Duplicate),
                Ok(()) => None,
            };
            if let Some(problem) = problem {
                return Err(LadderError::Rung {
                    ladder: name.to_owned(),
                    rung: rung_label(i, &r.name),
                    problem,
                });
            }
        }
        Ok(Ladder {
            name: name.to_owned(),
            rungs,
        })
    }

    /// The built-in ladder for sources up to 1080p: 1080p at 5000 kbit/s, 720p at 2800, 480p at
    /// 1400, 360p at 800, 240p at 400 (high profile down to 480p, main at 360p, baseline at
    /// 240p for the oldest decoders), each at the source's frame rate.
    pub fn default_ladder() -> Ladder {
        let rungs = vec![
            Rung::new("1080p", 1080, None, 5000, Profile::High),
            Rung::new("720p", 720, None, 2800, Profile::High),
            Rung::new("480p", 480, None, 1400, Profile::High),
            Rung::new("360p", 360, None, 800, Profile::Main),
            Rung::new("240p", 240, None, 400, Profile::Baseline),
        ];
        Ladder::new(DEFAULT_LADDER, rungs).expect("the default ladder is valid")
    }

    /// The rungs made of a `width`×`height` source: those no taller than the source, each at
    /// its height with the width following the source's aspect ratio (rounded to even, never
    /// wider than the source). A source shorter than every rung gets one rung at its own size
    /// (rounded down to even), with the shortest rung's frame rate and profile and its bitrate
    /// scaled by the pixel count. Empty only for a source of zero size.
    pub fn for_source(&self, width: u32, height: u32) -> Vec<Rung> {
        if width < 2 || height < 2 {
            return Vec::new();
        }
        let even_w = width & !1;
        let fit: Vec<Rung> = self
            .rungs
            .iter()
            .filter(|r| r.height <= height)
            .map(|r| Rung {
                width: even_round(u64::from(r.height) * u64::from(width), u64::from(height))
                    .min(even_w),
                ..r.clone()
            })
            .collect();
        if !fit.is_empty() {
            return fit;
        }
        let smallest = self
            .rungs
            .iter()
            .min_by_key(|r| r.height)
            .expect("a ladder has rungs");
        let (w, h) = (even_w, height & !1);
        let pixels = u64::from(w) * u64::from(h);
        let rung_pixels = u64::from(smallest.width) * u64::from(smallest.height);
        let bitrate = u64::from(smallest.bitrate_kbps) * pixels / rung_pixels.max(1);
        vec![Rung {
            name: format!("{h}p"),
            width: w,
            height: h,
            bitrate_kbps: bitrate.clamp(1, u64::from(smallest.bitrate_kbps)) as u32,
            ..smallest.clone()
        }]
    }

    /// A ladder from its configuration table (`[ladders.NAME]`), checked.
    pub fn from_spec(name: &str, spec: &LadderSpec) -> Result<Ladder, LadderError> {
        let mut rungs = Vec::with_capacity(spec.rungs.len());
        for (i, r) in spec.rungs.iter().enumerate() {
            let profile = match r.profile.as_deref() {
                None => Profile::High,
                Some(p) => Profile::parse(p).ok_or_else(|| LadderError::Rung {
                    ladder: name.to_owned(),
                    rung: rung_label(i, &r.name),
                    problem: RungProblem::UnknownProfile(p.to_owned()),
                })?,
            };
            rungs.push(Rung::new(&r.name, r.height, r.fps, r.bitrate_kbps, profile));
        }
        Ladder::new(name, rungs)
    }
}

/// How an error names the rung at `index`: its name, or its position when it has none to show.
fn rung_label(index: usize, name: &str) -> String {
    if name_ok(name) {
        format!("{name:?}")
    } else {
        format!("#{}", index + 1)
    }
}

/// A ladder as the configuration file writes it:
///
/// ```toml
/// [ladders.mobile]
/// rungs = [
///   { name = "720p", height = 720, bitrate-kbps = 2500 },
///   { name = "360p", height = 360, bitrate-kbps = 700, fps = 30, profile = "main" },
/// ]
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LadderSpec {
    /// The rungs, in order.
    pub rungs: Vec<RungSpec>,
}

/// One rung as the configuration file writes it (see [`LadderSpec`]).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RungSpec {
    /// Its name.
    pub name: String,
    /// Its height; the width follows the source's aspect ratio.
    pub height: u32,
    /// Target bitrate, kbit/s.
    pub bitrate_kbps: u32,
    /// The most frames a second [default: the source's].
    #[serde(default)]
    pub fps: Option<u32>,
    /// `baseline`, `main` or `high` [default: high].
    #[serde(default)]
    pub profile: Option<String>,
}

/// Which broadcasts get a ladder without being asked (`--transcode`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TranscodeRule {
    /// None (only marked ones).
    #[default]
    None,
    /// Every broadcast published on an origin.
    All,
    /// Those of these apps (the part of `app/key` before the `/`).
    Apps(BTreeSet<String>),
}

impl TranscodeRule {
    /// `none`, `all`, or a comma-separated list of apps (`live,events`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "none" => return Ok(TranscodeRule::None),
            "all" => return Ok(TranscodeRule::All),
            _ => {}
        }
        let mut apps = BTreeSet::new();
        for app in s.split(',').map(str::trim) {
            if app.is_empty() || app.len() > 128 || !app.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "{s:?}: none, all, or a comma-separated list of apps (1 to 128 printable \
                     characters each, no spaces)"
                ));
            }
            if app.contains('/') {
                return Err(format!("{app:?}: an app has no '/' (live, not live/key)"));
            }
            apps.insert(app.to_owned());
        }
        Ok(TranscodeRule::Apps(apps))
    }

    /// Whether `broadcast` (`app/key`) gets a ladder by the rule.
    pub(crate) fn matches(&self, broadcast: &str) -> bool {
        match self {
            TranscodeRule::None => false,
            TranscodeRule::All => true,
            TranscodeRule::Apps(apps) => broadcast
                .split_once('/')
                .is_some_and(|(app, _)| apps.contains(app)),
        }
    }
}

impl std::fmt::Display for TranscodeRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TranscodeRule::None => f.write_str("none"),
            TranscodeRule::All => f.write_str("all"),
            TranscodeRule::Apps(apps) => {
                let list: Vec<&str> = apps.iter().map(String::as_str).collect();
                f.write_str(&list.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(rungs: &[Rung]) -> Vec<(u32, u32)> {
        rungs.iter().map(|r| (r.width, r.height)).collect()
    }

    #[test]
    fn default_ladder_fits_sources_without_upscaling() {
        let l = Ladder::default_ladder();
        assert_eq!(
            sizes(&l.rungs),
            [
                (1920, 1080),
                (1280, 720),
                (854, 480),
                (640, 360),
                (426, 240)
            ]
        );
        assert_eq!(sizes(&l.for_source(1920, 1080)), sizes(&l.rungs));
        // A 720p source gets 720p and below.
        let r = l.for_source(1280, 720);
        assert_eq!(r[0].name, "720p");
        assert_eq!(sizes(&r), [(1280, 720), (854, 480), (640, 360), (426, 240)]);
        // 4:3 and portrait: the height applies, the width follows, even.
        assert_eq!(
            sizes(&l.for_source(1440, 1080)),
            [(1440, 1080), (960, 720), (640, 480), (480, 360), (320, 240)]
        );
        assert_eq!(
            sizes(&l.for_source(720, 1280))[..2],
            [(608, 1080), (406, 720)]
        );
        // An odd-sized source: never wider than it, even.
        assert_eq!(sizes(&l.for_source(853, 481))[0], (852, 480));
        // 4K gets the ladder as it is (never more than asked).
        assert_eq!(sizes(&l.for_source(3840, 2160)), sizes(&l.rungs));
    }

    #[test]
    fn a_small_source_gets_one_rung_at_its_own_size() {
        let l = Ladder::default_ladder();
        let r = l.for_source(320, 180);
        assert_eq!(sizes(&r), [(320, 180)]);
        assert_eq!(r[0].name, "180p");
        assert_eq!(r[0].profile, Profile::Baseline);
        // 400 kbit/s × (320×180)/(426×240).
        assert_eq!(r[0].bitrate_kbps, 225);
        assert_eq!(sizes(&l.for_source(175, 99)), [(174, 98)]);
        assert!(l.for_source(0, 0).is_empty());
    }

    fn rung(name: &str, height: u32, kbps: u32) -> RungSpec {
        RungSpec {
            name: name.into(),
            height,
            bitrate_kbps: kbps,
            fps: None,
            profile: None,
        }
    }

    #[test]
    fn bad_rungs_are_named() {
        let check = |rungs: Vec<RungSpec>| Ladder::from_spec("mobile", &LadderSpec { rungs });
        let err = check(vec![rung("720p", 720, 2500), rung("odd", 361, 700)]).unwrap_err();
        assert_eq!(
            err,
            LadderError::Rung {
                ladder: "mobile".into(),
                rung: "\"odd\"".into(),
                problem: RungProblem::OddSize(361),
            }
        );
        assert_eq!(
            err.to_string(),
            "ladder \"mobile\", rung \"odd\": odd size 361 (4:2:0 video needs even sizes)"
        );
        let problem = |rungs| match check(rungs) {
            Err(LadderError::Rung { problem, rung, .. }) => (rung, problem),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            problem(vec![rung("zero", 0, 100)]),
            ("\"zero\"".into(), RungProblem::ZeroSize)
        );
        assert_eq!(
            problem(vec![rung("free", 360, 0)]),
            ("\"free\"".into(), RungProblem::ZeroBitrate)
        );
        assert_eq!(
            problem(vec![rung("a", 360, 1), rung("a", 240, 1)]),
            ("\"a\"".into(), RungProblem::Duplicate)
        );
        assert_eq!(
            problem(vec![rung("a", 360, 1), rung("", 240, 1)]),
            ("#2".into(), RungProblem::BadName)
        );
        assert_eq!(
            problem(vec![rung("source", 360, 1)]),
            ("\"source\"".into(), RungProblem::Reserved)
        );
        assert_eq!(
            problem(vec![rung("8k", 8640, 1)]),
            ("\"8k\"".into(), RungProblem::TooTall(8640))
        );
        let mut r = rung("fast", 360, 1);
        r.fps = Some(0);
        assert_eq!(
            problem(vec![r]),
            ("\"fast\"".into(), RungProblem::BadFps(0))
        );
        let mut r = rung("hi10", 360, 1);
        r.profile = Some("high10".into());
        assert_eq!(
            problem(vec![r]),
            (
                "\"hi10\"".into(),
                RungProblem::UnknownProfile("high10".into())
            )
        );
        assert_eq!(check(vec![]), Err(LadderError::Empty("mobile".into())));
        assert!(matches!(
            Ladder::from_spec(
                "a b",
                &LadderSpec {
                    rungs: vec![rung("x", 2, 1)]
                }
            ),
            Err(LadderError::BadName(_))
        ));
    }

    #[test]
    fn a_spec_from_toml() {
        let spec: LadderSpec = toml::from_str(
            "rungs = [\n  { name = \"720p\", height = 720, bitrate-kbps = 2500 },\n  \
             { name = \"360p\", height = 360, bitrate-kbps = 700, fps = 30, profile = \"main\" },\n]\n",
        )
        .unwrap();
        let l = Ladder::from_spec("mobile", &spec).unwrap();
        assert_eq!(
            l.rungs[1],
            Rung {
                name: "360p".into(),
                width: 640,
                height: 360,
                fps: Some(30),
                bitrate_kbps: 700,
                profile: Profile::Main,
            }
        );
        assert_eq!(l.rungs[0].profile, Profile::High);
        let unknown = toml::from_str::<LadderSpec>("rungs = [{ name = \"a\", width = 2 }]");
        assert!(unknown.is_err());
    }
}
