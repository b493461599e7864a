//! The first page (`GET /`): what is live with its play links (one per ABR rung too, with the
//! rung's size and measured bitrate), the OBS settings, the publisher page, and links to the
//! console, the API and the metrics. Rendered on the server from
//! `assets/index.html`, so that it reads without scripts; its script only refreshes the list.
//!
//! Guarantees: HTTP links name the host the page was asked for (its `Host` header, else the
//! node's public host and HTTP port); RTMP links name the node's public host and its bound RTMP
//! port (when the public host is the default `localhost`, the host name the page was asked for
//! instead, since that is the one the reader reaches). Every name is HTML-escaped.

use std::fmt::Write as _;

use axum::http::{HeaderMap, Uri, header};

use crate::media::hub::BroadcastInfo;

/// What the first page tells about the node, known once its listeners are bound.
#[derive(Clone, Debug)]
pub(crate) struct NodeFacts {
    /// `standalone`, `origin`, `relay` or `edge`.
    pub(crate) role: String,
    /// The node's id (`--node-id`).
    pub(crate) node_id: String,
    /// `--public-host`.
    pub(crate) public_host: String,
    /// The bound HTTP port.
    pub(crate) http_port: u16,
    /// The bound RTMP port, when the node takes RTMP.
    pub(crate) rtmp_port: Option<u16>,
    /// The WebRTC UDP address, when the node serves WHIP and WHEP.
    pub(crate) webrtc_udp: Option<String>,
    /// The node serves the console (`/console`, standalone's embedded manager).
    pub(crate) console: bool,
}

/// `s` escaped for HTML text and quoted attributes (and braces).
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Not markup, but no name may look like one of the page template's placeholders.
            '{' => out.push_str("&#123;"),
            '}' => out.push_str("&#125;"),
            c => out.push(c),
        }
    }
    out
}

/// Whether `s` can be a `Host` value (name or address, optional port): nothing else is echoed.
fn host_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
}

/// The host (and port) the page was asked for.
pub(crate) fn request_host(headers: &HeaderMap, uri: &Uri, facts: &NodeFacts) -> String {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.as_str().to_owned()))
        .filter(|h| host_ok(h))
        .unwrap_or_else(|| format!("{}:{}", facts.public_host, facts.http_port))
}

/// The host name of a `Host` value (without its port).
fn host_name(host: &str) -> &str {
    if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        return &host[..end + 2];
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// The first page for a reader who asked for it at `host`, with `broadcasts` live now.
pub(crate) fn render(facts: &NodeFacts, host: &str, broadcasts: &[BroadcastInfo]) -> String {
    let http = format!("http://{host}");
    let rtmp_host = if facts.public_host == "localhost" {
        host_name(host)
    } else {
        facts.public_host.as_str()
    };
    let rtmp = facts.rtmp_port.map(|p| format!("rtmp://{rtmp_host}:{p}"));
    include_str!("assets/index.html")
        .replace("{{ROLE}}", &escape(&facts.role))
        .replace("{{NODE_ID}}", &escape(&facts.node_id))
        .replace("{{LIVE}}", &live(facts, &http, rtmp.as_deref(), broadcasts))
        .replace("{{PUBLISH}}", &publish(facts, &http, rtmp.as_deref()))
        .replace("{{LINKS}}", &links(facts, &http))
}

/// `<a href="url"><code>url</code></a>`.
fn link(url: &str) -> String {
    let u = escape(url);
    format!("<a href=\"{u}\"><code>{u}</code></a>")
}

fn live(facts: &NodeFacts, http: &str, rtmp: Option<&str>, broadcasts: &[BroadcastInfo]) -> String {
    let mut s = String::from("    <h2>Live now</h2>\n");
    if broadcasts.is_empty() {
        let how = match (facts.role.as_str(), rtmp.is_some()) {
            ("edge", _) => {
                "An edge fetches a broadcast from upstream when someone opens it: open \
                 <code>/play/live/KEY</code> or <code>/live/KEY.flv</code> here, or publish \
                 below."
            }
            (_, true) => "Publish with OBS or ffmpeg (settings below), or from the browser page.",
            (_, false) => "This node takes no publishers; it carries what other nodes fetch.",
        };
        let _ = writeln!(
            s,
            "    <p class=\"none\">Nothing is live on this node right now. {how}</p>"
        );
        return s;
    }
    s.push_str(
        "    <table><thead><tr><th>broadcast</th><th>tracks</th><th>watch</th>\
         <th>players</th><th>node subscriptions</th></tr></thead><tbody>\n",
    );
    for b in broadcasts {
        let (app, key) = b.name.split_once('/').unwrap_or(("live", b.name.as_str()));
        // The source's tracks; a ladder's rungs are listed apart, by name.
        let tracks: Vec<String> = b
            .tracks
            .iter()
            .filter(|t| t.rendition.is_none())
            .map(|t| match (t.width, t.height) {
                (Some(w), Some(h)) => format!("{} {w}×{h} {} fps", t.codec, t.fps),
                _ => t.codec.to_owned(),
            })
            .collect();
        let mut tracks = escape(&tracks.join(", "));
        if !b.renditions.is_empty() {
            let _ = write!(
                tracks,
                "<br><span class=\"small\">renditions:</span> {}",
                escape(&renditions(b).join(", "))
            );
        }
        let state = if b.publishing {
            ""
        } else {
            " <span class=\"small\">(publisher gone; waiting for it)</span>"
        };
        let mut watch = String::new();
        if facts.webrtc_udp.is_some() {
            let _ = write!(
                watch,
                "Browser (WebRTC): {}<br>",
                link(&format!("{http}/play/{}", b.name))
            );
        }
        let _ = write!(
            watch,
            "HTTP-FLV: {}",
            link(&format!("{http}/{}.flv", b.name))
        );
        if !b.renditions.is_empty() {
            // The browser player where the node serves WHEP, else HTTP-FLV. (Names go in the
            // query raw: castnode matches `?rendition=` as written.)
            let rungs: Vec<String> = b
                .renditions
                .iter()
                .map(|r| {
                    let url = match facts.webrtc_udp {
                        Some(_) => format!("{http}/play/{}?rendition={r}", b.name),
                        None => format!("{http}/{}.flv?rendition={r}", b.name),
                    };
                    format!("<a href=\"{}\">{}</a>", escape(&url), escape(r))
                })
                .collect();
            let _ = write!(
                watch,
                "<br>Renditions: {}<br><span class=\"small\">(HTTP-FLV, RTMP and WHEP URLs \
                 take <code>?rendition=NAME</code>)</span>",
                rungs.join(" · ")
            );
        }
        if let Some(rtmp) = rtmp {
            let _ = write!(
                watch,
                "<br>RTMP: <code>{}</code><br><span class=\"small\">OBS: server <code>{}</code>, \
                 stream key <code>{}</code></span>",
                escape(&format!("{rtmp}/{}", b.name)),
                escape(&format!("{rtmp}/{app}")),
                escape(key)
            );
        }
        let _ = writeln!(
            s,
            "    <tr><td><b>{}</b>{state}</td><td>{}</td><td>{watch}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&b.name),
            tracks,
            b.players,
            b.node_subscriptions
        );
    }
    s.push_str("    </tbody></table>\n");
    s
}

/// A broadcast's ABR rungs as the first page lists them: name, size and measured bitrate
/// (`360p 640×360 790 kbit/s`), tallest first.
fn renditions(b: &BroadcastInfo) -> Vec<String> {
    b.renditions
        .iter()
        .map(
            |r| match b.tracks.iter().find(|t| t.rendition.as_ref() == Some(r)) {
                Some(t) => match (t.width, t.height) {
                    (Some(w), Some(h)) => format!("{r} {w}×{h} {:.0} kbit/s", t.bitrate_kbps),
                    _ => format!("{r} {:.0} kbit/s", t.bitrate_kbps),
                },
                None => r.clone(),
            },
        )
        .collect()
}

fn publish(facts: &NodeFacts, http: &str, rtmp: Option<&str>) -> String {
    let Some(rtmp) = rtmp else {
        return "    <h2>Publish</h2>\n    <p class=\"none\">This node takes no publishers \
                (publish to an origin or an edge).</p>\n"
            .to_owned();
    };
    let mut s = String::from("    <h2>Publish</h2>\n    <dl>\n");
    let _ = writeln!(
        s,
        "      <dt>OBS</dt><dd>Settings → Stream → Service <i>Custom…</i><br>Server \
         <code>{}</code><br>Stream key <code>mystream</code> (any key; the broadcast is \
         <code>live/&lt;key&gt;</code>)</dd>",
        escape(&format!("{rtmp}/live"))
    );
    let _ = writeln!(
        s,
        "      <dt>ffmpeg</dt><dd><code>ffmpeg -re -i clip.flv -c copy -f flv {}</code></dd>",
        escape(&format!("{rtmp}/live/mystream"))
    );
    if facts.webrtc_udp.is_some() {
        let _ = writeln!(
            s,
            "      <dt>Browser</dt><dd>{} (camera and microphone over WHIP; browsers open \
             cameras only on https:// or http://localhost)</dd>",
            link(&format!("{http}/publish/live/mystream"))
        );
        let _ = writeln!(
            s,
            "      <dt>WHIP</dt><dd><code>{}</code> (OBS 30+, GStreamer)</dd>",
            escape(&format!("{http}/whip/live/mystream"))
        );
    }
    s.push_str("    </dl>\n");
    s
}

fn links(facts: &NodeFacts, http: &str) -> String {
    let mut s = String::from("    <dl>\n");
    if facts.console {
        let _ = writeln!(
            s,
            "      <dt>Console</dt><dd>{} (with the admin token the node printed at start)</dd>",
            link(&format!("{http}/console"))
        );
    }
    let _ = writeln!(
        s,
        "      <dt>Broadcasts API</dt><dd>{}</dd>",
        link(&format!("{http}/api/v1/broadcasts"))
    );
    let _ = writeln!(
        s,
        "      <dt>Metrics</dt><dd>{} (Prometheus)</dd>",
        link(&format!("{http}/metrics"))
    );
    let _ = writeln!(
        s,
        "      <dt>Health</dt><dd>{}</dd>",
        link(&format!("{http}/healthz"))
    );
    if let Some(udp) = &facts.webrtc_udp {
        let _ = writeln!(
            s,
            "      <dt>WebRTC</dt><dd>UDP <code>{}</code> (open it for browsers)</dd>",
            escape(udp)
        );
    }
    s.push_str("    </dl>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::hub::TrackSummary;

    fn facts(public_host: &str) -> NodeFacts {
        NodeFacts {
            role: "standalone".into(),
            node_id: "n1".into(),
            public_host: public_host.into(),
            http_port: 8080,
            rtmp_port: Some(1935),
            webrtc_udp: Some("0.0.0.0:8189".into()),
            console: true,
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(host_name("a.example:8080"), "a.example");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("a.example"), "a.example");
        assert!(!host_ok("a<b>"));
        let page = render(&facts("localhost"), "10.0.0.5:8080", &[]);
        assert!(page.contains("rtmp://10.0.0.5:1935/live"), "{page}");
        assert!(page.contains("Nothing is live"));
        let page = render(&facts("media.example"), "10.0.0.5:8080", &[]);
        assert!(page.contains("rtmp://media.example:1935/live"), "{page}");
        assert!(page.contains("http://10.0.0.5:8080/publish/live/mystream"));
    }

    #[test]
    fn names_are_escaped() {
        let b = BroadcastInfo {
            name: "live/<x>".into(),
            publishing: true,
            tracks: Vec::new(),
            renditions: Vec::new(),
            players: 0,
            node_subscriptions: 0,
            uptime_s: 0.0,
            bytes_in: 0,
            bytes_out: 0,
            frames_skipped: 0,
            ladder_from: None,
        };
        let page = render(&facts("localhost"), "h:1", &[b]);
        assert!(page.contains("live/&lt;x&gt;") && !page.contains("<x>"));
    }

    fn video(id: u8, w: u32, h: u32, kbps: f64, rendition: Option<&str>) -> TrackSummary {
        TrackSummary {
            id,
            kind: "video",
            codec: "h264",
            width: Some(w),
            height: Some(h),
            profile: None,
            sample_rate: None,
            channels: None,
            fps: 30.0,
            bitrate_kbps: kbps,
            b_frames: Some(false),
            keyframe_interval_s: None,
            rendition: rendition.map(str::to_owned),
        }
    }

    #[test]
    fn renditions_are_listed_with_play_links() {
        let b = BroadcastInfo {
            name: "live/abr".into(),
            publishing: true,
            tracks: vec![
                video(0, 1280, 720, 3012.4, None),
                video(2, 640, 360, 801.6, Some("360p")),
                video(3, 426, 240, 398.2, Some("240p")),
            ],
            renditions: vec!["360p".into(), "240p".into()],
            players: 0,
            node_subscriptions: 0,
            uptime_s: 0.0,
            bytes_in: 0,
            bytes_out: 0,
            frames_skipped: 0,
            ladder_from: None,
        };
        let page = render(&facts("localhost"), "h:1", std::slice::from_ref(&b));
        // The source's track alone among the tracks; the rungs by name, size and bitrate.
        assert!(page.contains("<td>h264 1280×720 30 fps<br>"), "{page}");
        assert!(
            page.contains("360p 640×360 802 kbit/s, 240p 426×240 398 kbit/s"),
            "{page}"
        );
        // A play link per rung: the browser player where the node serves WHEP.
        for r in ["360p", "240p"] {
            let url = format!("http://h:1/play/live/abr?rendition={r}");
            assert!(
                page.contains(&format!("<a href=\"{url}\">{r}</a>")),
                "{page}"
            );
        }
        // Without WebRTC, HTTP-FLV.
        let mut no_webrtc = facts("localhost");
        no_webrtc.webrtc_udp = None;
        let page = render(&no_webrtc, "h:1", &[b]);
        assert!(
            page.contains("<a href=\"http://h:1/live/abr.flv?rendition=240p\">240p</a>"),
            "{page}"
        );
        assert!(!page.contains("/play/"), "{page}");
    }
}
