//! The mixer's mix, read from the JSON file `--mix` names: the output broadcast, the canvas,
//! the encoder's bitrate, each input broadcast's rectangle, z-order, gain and mute, and PNG
//! overlays.
//!
//! ```json
//! { "name": "studio", "output": "live/mix", "width": 1280, "height": 360, "fps": 30,
//!   "bitrate_kbps": 2500,
//!   "inputs": [
//!     { "broadcast": "live/red",  "x": 0,   "y": 0, "w": 640, "h": 360 },
//!     { "broadcast": "live/blue", "x": 640, "y": 0, "w": 640, "h": 360,
//!       "z": 1, "gain": 0.5, "muted": false } ],
//!   "overlays": [ { "png": "logo.png", "x": 16, "y": 16, "z": 2 } ] }
//! ```
//!
//! Guarantees: [`MixConfig::read`] accepts only a mix the mixer can make, whole, and its error
//! names the offending field (`inputs[1].w`, as [`Layout::validate`] does; an input's id is its
//! `broadcast`): unknown fields are refused, broadcast names follow the hub's rule, the output
//! is none of the inputs, the bitrate is 1 to 100000 kbit/s, every overlay's PNG (a path
//! relative to the mix file's folder) is read and decoded. `z` defaults to 0, `gain` to 1,
//! `muted` to false, `bitrate_kbps` to 2500, `overlays` to none.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::ffmpeg::mix::{Image, Layout, Overlay, Placement};

/// A validated mix: its name, the output broadcast, the encoder's bitrate and the layout (each
/// input's id is the name of the broadcast it shows).
#[derive(Debug, Clone)]
pub struct MixConfig {
    /// The mix's name (for logs).
    pub name: String,
    /// The broadcast the mix is published as (`app/key`).
    pub output: String,
    /// The output video's bitrate, kbit/s.
    pub bitrate_kbps: u32,
    /// The canvas and where each input broadcast goes.
    pub layout: Layout,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MixFile {
    name: String,
    output: String,
    width: u32,
    height: u32,
    fps: u32,
    #[serde(default = "default_bitrate")]
    bitrate_kbps: u32,
    inputs: Vec<InputFile>,
    #[serde(default)]
    overlays: Vec<OverlayFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFile {
    broadcast: String,
    x: u32,
    y: u32,
    w: u32,
    h: u32,
    #[serde(default)]
    z: i32,
    #[serde(default = "one")]
    gain: f32,
    #[serde(default)]
    muted: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverlayFile {
    png: PathBuf,
    x: u32,
    y: u32,
    #[serde(default)]
    z: i32,
}

fn default_bitrate() -> u32 {
    2500
}

fn one() -> f32 {
    1.0
}

impl MixConfig {
    /// The mix in the JSON file at `path`, or why not (`PATH: FIELD: REASON`).
    pub fn read(path: &Path) -> Result<MixConfig, String> {
        let at = |e: String| format!("{}: {e}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, dir).map_err(at)
    }

    /// The mix in `json`, overlay paths relative to `dir`.
    pub(crate) fn parse(json: &str, dir: &Path) -> Result<MixConfig, String> {
        let file: MixFile = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if !crate::names::name_ok(&file.name) {
            return Err("name: 1 to 128 printable characters, no spaces".into());
        }
        if !crate::media::valid_name(&file.output) {
            return Err(format!(
                "output: {:?} is not a broadcast name (app/key)",
                file.output
            ));
        }
        if !(1..=100_000).contains(&file.bitrate_kbps) {
            return Err("bitrate_kbps: not 1 to 100000".into());
        }
        if file.inputs.is_empty() {
            return Err("inputs: none (a mix needs at least one input)".into());
        }
        let mut layout = Layout::new(file.width, file.height, file.fps);
        for (i, input) in file.inputs.iter().enumerate() {
            if !crate::media::valid_name(&input.broadcast) {
                return Err(format!(
                    "inputs[{i}].broadcast: {:?} is not a broadcast name (app/key)",
                    input.broadcast
                ));
            }
            if input.broadcast == file.output {
                return Err(format!(
                    "inputs[{i}].broadcast: {:?} is the output",
                    input.broadcast
                ));
            }
            let mut p = Placement::new(&input.broadcast, input.x, input.y, input.w, input.h);
            p.z = input.z;
            p.gain = input.gain;
            p.muted = input.muted;
            layout.inputs.push(p);
        }
        for (i, o) in file.overlays.iter().enumerate() {
            let path = dir.join(&o.png);
            let png = std::fs::read(&path)
                .map_err(|e| format!("overlays[{i}].png: {}: {e}", path.display()))?;
            let image = Image::from_png(&png)
                .map_err(|e| format!("overlays[{i}].png: {}: {e}", path.display()))?;
            layout.overlays.push(Overlay {
                image: Arc::new(image),
                x: o.x,
                y: o.y,
                z: o.z,
            });
        }
        layout.validate().map_err(|e| {
            // The layout's inputs are ids; in the file they are broadcasts.
            let field = match e.field.strip_suffix(".id") {
                Some(input) => format!("{input}.broadcast"),
                None => e.field,
            };
            format!("{field}: {}", e.reason)
        })?;
        Ok(MixConfig {
            name: file.name,
            output: file.output,
            bitrate_kbps: file.bitrate_kbps,
            layout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix(inputs: &str) -> String {
        format!(
            r#"{{ "name": "m", "output": "live/mix", "width": 1280, "height": 360, "fps": 30,
                 "inputs": [{inputs}] }}"#
        )
    }

    const TWO: &str = r#"{ "broadcast": "live/a", "x": 0, "y": 0, "w": 640, "h": 360 },
        { "broadcast": "live/b", "x": 640, "y": 0, "w": 640, "h": 360, "z": 1, "gain": 0.5,
          "muted": true }"#;

    #[test]
    fn a_side_by_side_mix_is_read_with_its_defaults() {
        let m = MixConfig::parse(&mix(TWO), Path::new(".")).unwrap();
        assert_eq!((m.name.as_str(), m.output.as_str()), ("m", "live/mix"));
        assert_eq!(m.bitrate_kbps, 2500);
        let l = &m.layout;
        assert_eq!((l.width, l.height, l.fps), (1280, 360, 30));
        assert_eq!(l.inputs[0], Placement::new("live/a", 0, 0, 640, 360));
        let b = &l.inputs[1];
        assert_eq!(
            (b.id.as_str(), b.x, b.z, b.gain, b.muted),
            ("live/b", 640, 1, 0.5, true)
        );
    }

    #[test]
    fn a_bad_mix_is_refused_naming_the_field() {
        let err = |json: &str| MixConfig::parse(json, Path::new(".")).unwrap_err();
        // The layout's own rules, with the file's field names.
        let odd = r#"{ "broadcast": "live/a", "x": 0, "y": 0, "w": 641, "h": 360 }"#;
        assert!(
            err(&mix(odd)).starts_with("inputs[0].w: odd"),
            "{}",
            err(&mix(odd))
        );
        let past = r#"{ "broadcast": "live/a", "x": 640, "y": 0, "w": 1280, "h": 360 }"#;
        assert!(err(&mix(past)).starts_with("inputs[0].x:"));
        let twice = r#"{ "broadcast": "live/a", "x": 0, "y": 0, "w": 2, "h": 2 },
                       { "broadcast": "live/a", "x": 0, "y": 0, "w": 2, "h": 2 }"#;
        assert_eq!(err(&mix(twice)), "inputs[1].broadcast: named twice");
        let name = r#"{ "broadcast": "live/../a", "x": 0, "y": 0, "w": 2, "h": 2 }"#;
        assert!(err(&mix(name)).starts_with("inputs[0].broadcast:"));
        let itself = r#"{ "broadcast": "live/mix", "x": 0, "y": 0, "w": 2, "h": 2 }"#;
        assert!(err(&mix(itself)).contains("is the output"));
        let loud = r#"{ "broadcast": "live/a", "x": 0, "y": 0, "w": 2, "h": 2, "gain": 17 }"#;
        assert!(err(&mix(loud)).starts_with("inputs[0].gain:"));
        assert!(err(&mix("")).starts_with("inputs: none"));
        // Unknown and missing fields, by serde.
        let typo = r#"{ "broadcast": "live/a", "x": 0, "y": 0, "w": 2, "h": 2, "gian": 1 }"#;
        assert!(err(&mix(typo)).contains("gian"));
        let short = r#"{ "broadcast": "live/a", "x": 0, "y": 0, "w": 2 }"#;
        assert!(err(&mix(short)).contains("`h`"));
        let fps = mix(TWO).replace("\"fps\": 30", "\"fps\": 0");
        assert!(err(&fps).starts_with("fps:"));
        let rate = mix(TWO).replace("\"fps\": 30", "\"fps\": 30, \"bitrate_kbps\": 0");
        assert!(err(&rate).starts_with("bitrate_kbps:"));
        let png = mix(TWO).replace(
            "\"inputs\"",
            "\"overlays\": [{ \"png\": \"no-such.png\", \"x\": 0, \"y\": 0 }], \"inputs\"",
        );
        assert!(err(&png).starts_with("overlays[0].png:"), "{}", err(&png));
    }
}
