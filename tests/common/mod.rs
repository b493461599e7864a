//! Test harness: real `castnode` processes on 127.0.0.1 with ports the kernel picks, the ffmpeg
//! CLI as publisher and player, and small helpers to read what comes back. Every process started
//! here is killed when its guard drops.
#![allow(dead_code)] // Each test file uses a different part of the harness.

pub mod probe;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once, mpsc};
use std::time::{Duration, Instant};

/// The `castnode` binary the tests start: this build's, or `CASTNODE_TEST_BIN` (say a release
/// build, to see the figures a test prints as a user's build gives them).
pub fn castnode_bin() -> std::ffi::OsString {
    std::env::var_os("CASTNODE_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_castnode").into())
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Waits up to `limit` for the process to exit by itself; its status, or `None` on timeout.
    pub fn wait_for(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.0.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// A running `castnode standalone`.
/// The admin API token a test manager gets unless the test passes its own.
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

pub struct Server {
    proc: Proc,
    /// The cluster link's UDP port (0 when the node serves none).
    pub cluster_port: u16,
    /// The WebRTC UDP port (0 when none).
    pub udp_port: u16,
    pub rtmp_port: u16,
    pub http_port: u16,
    /// The address the test reaches the node at (127.0.0.1 unless started with
    /// [`Server::start_at`]).
    pub host: String,
    log: Arc<Mutex<String>>,
    printed: Arc<Mutex<String>>,
}

/// The port of the `NAME=ADDR:PORT` field `scheme` (`"rtmp="`) of a log line, whatever the
/// address (`127.0.0.1`, `0.0.0.0`, `[::]`).
fn port_after(line: &str, scheme: &str) -> Option<u16> {
    let rest = &line[line.find(scheme)? + scheme.len()..];
    let field = rest.split(char::is_whitespace).next()?;
    field.rsplit_once(':')?.1.parse().ok()
}

impl Server {
    /// Starts `castnode standalone` with extra flags; waits until it has started.
    pub fn start(extra: &[&str]) -> Server {
        Server::start_role("standalone", extra)
    }

    /// Starts `castnode ROLE` on 127.0.0.1 ports the kernel picks (plus `extra` flags); waits
    /// for its "node started" log line and reads the bound ports from it.
    pub fn start_role(role: &str, extra: &[&str]) -> Server {
        Server::start_at(&[], "127.0.0.1", role, extra, |_| {})
    }

    /// [`Server::start_role`], with `setup` applied to the command last (working directory,
    /// environment).
    pub fn start_role_with(role: &str, extra: &[&str], setup: impl FnOnce(&mut Command)) -> Server {
        Server::start_at(&[], "127.0.0.1", role, extra, setup)
    }

    /// [`Server::start_role_with`] run through `wrapper` (say `ip netns exec NS`; empty: none),
    /// the test reaching it at `host`.
    pub fn start_at(
        wrapper: &[&str],
        host: &str,
        role: &str,
        extra: &[&str],
        setup: impl FnOnce(&mut Command),
    ) -> Server {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(castnode_bin());
                c
            }
            None => Command::new(castnode_bin()),
        };
        cmd.arg(role);
        for flag in ["--rtmp", "--http", "--webrtc-udp"] {
            if !extra.contains(&flag) {
                cmd.args([flag, "127.0.0.1:0"]);
            }
        }
        cmd.args(["--public-host", host]);
        if matches!(role, "origin" | "relay") && !extra.contains(&"--cluster") {
            cmd.args(["--cluster", "127.0.0.1:0"]);
        }
        if role == "manager" {
            // In memory unless the test says otherwise (a flag, or removing the variable).
            cmd.env("CASTNODE_DB", ":memory:");
            if !extra.contains(&"--admin-token") {
                cmd.args(["--admin-token", ADMIN_TOKEN]);
            }
        }
        cmd.args(extra)
            .env("RUST_LOG", "info,castnode=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        setup(&mut cmd);
        let mut child = cmd.spawn().expect("start castnode");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let (started_tx, started) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("node started") {
                    let _ = started_tx.send(line.clone());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        // Keep draining stdout so the process never blocks on it (kept for `printed`).
        let stdout = child.stdout.take().unwrap();
        let printed = Arc::new(Mutex::new(String::new()));
        let out = printed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut o = out.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        });
        let line = started
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("castnode {role} did not start:\n{}", log.lock().unwrap()));
        let field = |name: &str| port_after(&line, &format!("{name}=")).unwrap_or(0);
        Server {
            proc: Proc(child),
            rtmp_port: field("rtmp"),
            http_port: field("http"),
            cluster_port: field("cluster"),
            udp_port: field("webrtc_udp"),
            host: host.to_owned(),
            log,
            printed,
        }
    }

    /// The PID of the node (for `kill -9` tests).
    pub fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// Stops the node as an operator would (SIGTERM) and waits up to `limit` for it to exit;
    /// whether it did (it is killed otherwise).
    pub fn stop(&mut self, limit: Duration) -> bool {
        if let Ok(Some(_)) = self.proc.0.try_wait() {
            // Already ended (and reaped): its PID may belong to another process by now.
            return true;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let exited = self.proc.wait_for(limit).is_some();
        self.kill();
        exited
    }

    /// Kills the node at once (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
    }

    pub fn rtmp_url(&self, key: &str) -> String {
        format!("rtmp://{}:{}/live/{key}", self.host, self.rtmp_port)
    }

    pub fn flv_url(&self, key: &str) -> String {
        format!("http://{}:{}/live/{key}.flv", self.host, self.http_port)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Everything the node printed on stdout so far (its banner).
    pub fn printed(&self) -> String {
        self.printed.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        wait_until(limit, || self.log().contains(needle))
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.proc.0.try_wait(), Ok(None))
    }

    /// A blocking `GET` on the node's HTTP port: (status, headers, body).
    pub fn get(&self, path: &str) -> (u16, String, String) {
        http_request_at(&self.host, self.http_port, "GET", path, None, None, b"")
    }

    /// Waits until `name` is live with video (the publisher has sent a keyframe).
    pub fn wait_live(&self, name: &str, limit: Duration) {
        let ok = wait_until(limit, || {
            let (_, _, body) = self.get("/api/v1/broadcasts");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            v["broadcasts"].as_array().is_some_and(|a| {
                a.iter().any(|b| {
                    b["name"] == name
                        && b["publishing"] == true
                        && b["bytes_in"].as_u64() > Some(50_000)
                })
            })
        });
        assert!(ok, "{name} did not go live; log:\n{}", self.log());
    }

    /// A Prometheus sample's value (first series whose line starts with `series`).
    pub fn metric(&self, series: &str) -> f64 {
        let (_, _, body) = self.get("/metrics");
        body.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {series} in:\n{body}"))
    }
}

/// Polls `f` every 50 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal HTTP/1.1 GET with `Connection: close`.
pub fn http_get(port: u16, path: &str) -> (u16, String, String) {
    http_request(port, "GET", path, None, b"")
}

/// A minimal HTTP/1.1 request with `Connection: close`: (status, head, body).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    ctype: Option<&str>,
    body: &[u8],
) -> (u16, String, String) {
    http_request_with(port, method, path, ctype, None, body)
}

/// [`http_request`] with a bearer token.
pub fn http_request_with(
    port: u16,
    method: &str,
    path: &str,
    ctype: Option<&str>,
    bearer: Option<&str>,
    body: &[u8],
) -> (u16, String, String) {
    http_request_at("127.0.0.1", port, method, path, ctype, bearer, body)
}

/// [`http_request_with`] to `host`.
pub fn http_request_at(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    ctype: Option<&str>,
    bearer: Option<&str>,
    body: &[u8],
) -> (u16, String, String) {
    let ctype = ctype
        .map(|c| format!("Content-Type: {c}\r\nContent-Length: {}\r\n", body.len()))
        .unwrap_or_default();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{ctype}{auth}Connection: close\r\n\r\n"
    );
    http_exchange(host, port, &head, body)
}

/// Sends one request (`head` with its blank line, then `body`) to `host:port` and reads the
/// answer to the end: (status, head, body).
pub fn http_exchange(host: &str, port: u16, head: &str, body: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect((host, port)).expect("connect HTTP");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// Path of a fixture, generated by `fixtures/make.sh` on first use.
pub fn fixture(name: &str) -> PathBuf {
    static MAKE: Once = Once::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    MAKE.call_once(|| {
        let ok = Command::new("bash")
            .arg(dir.join("make.sh"))
            .status()
            .expect("run fixtures/make.sh")
            .success();
        assert!(ok, "fixtures/make.sh failed");
    });
    dir.join(name)
}

/// Starts `c` with no terminal I/O.
fn quiet(c: &mut Command) -> Proc {
    Proc(
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a test process"),
    )
}

/// `ffmpeg -re [-stream_loop N] -i F -c copy -f flv URL`: how OBS publishes, as far as ffmpeg can.
pub fn ffmpeg_publish(url: &str, fixture: &Path, loops: u32) -> Proc {
    let mut c = Command::new("ffmpeg");
    c.args(["-hide_banner", "-nostdin", "-loglevel", "error", "-re"]);
    if loops > 0 {
        c.args(["-stream_loop", &loops.to_string()]);
    }
    c.arg("-i")
        .arg(fixture)
        .args(["-c", "copy", "-f", "flv", url]);
    quiet(&mut c)
}

/// `ffmpeg -i URL [-t S] -map 0 -c copy -f framemd5 OUT`: a player writing one md5 per packet.
pub fn ffmpeg_framemd5(url: &str, seconds: Option<f64>, out: &Path) -> Proc {
    let mut c = Command::new("ffmpeg");
    c.args([
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-rw_timeout",
        "15000000",
        "-i",
        url,
    ]);
    if let Some(s) = seconds {
        c.args(["-t", &s.to_string()]);
    }
    c.args(["-map", "0", "-c", "copy", "-f", "framemd5", "-y"])
        .arg(out);
    quiet(&mut c)
}

/// One packet line of a framemd5 listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    pub stream: u32,
    pub dts: i64,
    pub size: usize,
    pub md5: String,
}

/// Parses ffmpeg's framemd5 output.
pub fn parse_framemd5(text: &str) -> Vec<Packet> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            Some(Packet {
                stream: f[0].parse().ok()?,
                dts: f[1].parse().ok()?,
                size: f[4].parse().ok()?,
                md5: f[5].to_owned(),
            })
        })
        .collect()
}

/// The framemd5 listing of a file, read directly with ffmpeg.
pub fn source_packets(path: &Path) -> Vec<Packet> {
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-i"])
        .arg(path)
        .args(["-map", "0", "-c", "copy", "-f", "framemd5", "-"])
        .output()
        .expect("ffmpeg framemd5");
    parse_framemd5(&String::from_utf8_lossy(&out.stdout))
}

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("castnode-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Checks, stream by stream (0 video, 1 audio), that a player's packets are a contiguous run of
/// the looped source; returns how many packets of each stream it got.
pub fn assert_contiguous(what: &str, source: &[Packet], got: &[Packet]) -> [usize; 2] {
    let mut counts = [0; 2];
    for stream in [0, 1] {
        let src: Vec<String> = source
            .iter()
            .filter(|p| p.stream == stream)
            .map(|p| p.md5.clone())
            .collect();
        let mine: Vec<String> = got
            .iter()
            .filter(|p| p.stream == stream)
            .map(|p| p.md5.clone())
            .collect();
        if let Err(e) = contiguous(&src, &mine) {
            panic!("{what}: stream {stream}: {e}");
        }
        counts[stream as usize] = mine.len();
    }
    counts
}

/// Checks that `got` (one stream of a player's packets) is a contiguous run of the looped
/// `source` sequence: each packet follows its predecessor in the source. Returns the first break.
pub fn contiguous(source: &[String], got: &[String]) -> Result<(), String> {
    let n = source.len();
    for (i, w) in got.windows(2).enumerate() {
        let follows = (0..n).any(|j| source[j] == w[0] && source[(j + 1) % n] == w[1]);
        if !follows {
            return Err(format!(
                "packet {} ({}) does not follow packet {} ({}) in the source",
                i + 1,
                w[1],
                i,
                w[0]
            ));
        }
    }
    Ok(())
}

/// Blocking RTMP session with castnode's own client: handshake, connect and publish or play.
pub struct RtmpClient {
    pub sock: TcpStream,
    pub conn: castnode::rtmp::client::ClientConn,
    buf: Vec<u8>,
}

impl RtmpClient {
    /// Connects and waits until publishing/playing has started (panics on refusal).
    pub fn open(sock: TcpStream, key: &str, publish: bool) -> RtmpClient {
        Self::try_open(sock, key, publish).unwrap_or_else(|code| panic!("refused: {code}"))
    }

    /// Connects and waits until publishing/playing has started; the status code on refusal.
    pub fn try_open(sock: TcpStream, key: &str, publish: bool) -> Result<RtmpClient, String> {
        Self::try_open_app(sock, "live", key, publish)
    }

    /// [`RtmpClient::try_open`] in RTMP application `app`.
    pub fn try_open_app(
        sock: TcpStream,
        app: &str,
        key: &str,
        publish: bool,
    ) -> Result<RtmpClient, String> {
        use castnode::rtmp::client::{ClientConn, ClientEvent, Mode};
        let port = sock.peer_addr().unwrap().port();
        let mode = if publish {
            Mode::Publish(key.into())
        } else {
            Mode::Play(key.into())
        };
        let conn = ClientConn::new(app, &format!("rtmp://127.0.0.1:{port}/{app}"), mode, 9);
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        sock.set_nodelay(true).unwrap();
        let mut c = RtmpClient {
            sock,
            conn,
            buf: vec![0; 65536],
        };
        loop {
            c.flush();
            for e in c.read_events() {
                match e {
                    ClientEvent::Ready => return Ok(c),
                    ClientEvent::Refused(code) => return Err(code),
                    ClientEvent::Ended => return Err("connection closed".into()),
                    _ => {}
                }
            }
        }
    }

    pub fn connect(port: u16, key: &str, publish: bool) -> RtmpClient {
        Self::open(
            TcpStream::connect(("127.0.0.1", port)).expect("connect RTMP"),
            key,
            publish,
        )
    }

    /// Writes what the session queued.
    pub fn flush(&mut self) {
        while let Some(b) = self.conn.poll_transmit() {
            self.sock.write_all(&b).expect("write to castnode");
        }
    }

    /// Reads once and returns the events it produced (empty at end of stream).
    pub fn read_events(&mut self) -> Vec<castnode::rtmp::client::ClientEvent> {
        let n = self.sock.read(&mut self.buf).unwrap_or(0);
        if n == 0 {
            return vec![castnode::rtmp::client::ClientEvent::Ended];
        }
        self.conn
            .handle_input(&self.buf[..n])
            .expect("valid RTMP from castnode");
        self.flush();
        std::iter::from_fn(|| self.conn.poll_event()).collect()
    }
}

/// Publishes an FLV file `loops` times in real time with castnode's client: the tag with
/// timestamp `ts` (continuing across loops) is sent at `t0 + ts`. Returns `t0` and the thread.
pub fn publish_paced(
    port: u16,
    key: &str,
    path: &Path,
    loops: u32,
) -> (Instant, std::thread::JoinHandle<()>) {
    use castnode::rtmp::flv::{FlvReader, TAG_SCRIPT};
    let data = bytes::Bytes::from(std::fs::read(path).expect("read fixture"));
    let mut c = RtmpClient::connect(port, key, true);
    let t0 = Instant::now();
    let handle = std::thread::spawn(move || {
        let last = FlvReader::new(data.clone())
            .unwrap()
            .map(|t| t.ts_ms)
            .max()
            .unwrap_or(0);
        for lap in 0..loops {
            let offset = lap * (last + 33);
            for tag in FlvReader::new(data.clone()).unwrap() {
                if tag.tag_type == TAG_SCRIPT {
                    if lap == 0
                        && let Ok(v) = castnode::rtmp::amf0::decode_all(&tag.body)
                        && let Some(meta) = v.into_iter().nth(1)
                    {
                        c.conn.send_metadata(meta);
                    }
                    continue;
                }
                let ts = tag.ts_ms + offset;
                let due = t0 + Duration::from_millis(u64::from(ts));
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                c.conn.send_media(tag.tag_type, ts, &[&tag.body]);
                c.flush();
            }
        }
        c.conn.finish();
        c.flush();
    });
    (t0, handle)
}

// --- headless Chromium (see docs/testing.md) ---

/// Whether Debian's `chromium` is installed (tests that need it skip, saying so, where not).
pub fn has_chromium() -> bool {
    if Command::new("chromium").arg("--version").output().is_ok() {
        return true;
    }
    eprintln!("SKIPPED: chromium is not installed (./setup.sh test installs it)");
    false
}

/// A page that opens `viewers` WHEP viewers of `whep` and POSTs their figures (JSON array) to
/// `/report` of the page's origin after measuring 10 s.
pub fn whep_viewers_page(whep: &str, viewers: usize) -> String {
    format!(
        r#"<!doctype html><html><body><script>
{WHEP_RECVONLY_JS}
const WHEP = "{whep}";
async function viewer(i) {{
  const {{ pc, video }} = await recvonly();
  const t0 = performance.now();
  // When the connection came up, for the breakdown of the time to first frame.
  const connected = new Promise((r) => {{
    pc.onconnectionstatechange = () => pc.connectionState === "connected" && r(performance.now() - t0);
  }});
  const res = await fetch(WHEP, {{ method: "POST", headers: {{ "Content-Type": "application/sdp" }}, body: pc.localDescription.sdp }});
  if (res.status !== 201) throw new Error("WHEP answered " + res.status + ": " + await res.text());
  const location = res.headers.get("Location");
  const answerMs = performance.now() - t0;
  await pc.setRemoteDescription({{ type: "answer", sdp: await res.text() }});
  // First packet of video, first decoded frame, first presented frame.
  const firstPacket = (async () => {{
    while (true) {{
      let n = 0;
      (await pc.getStats()).forEach((s) => {{ if (s.type === "inbound-rtp" && s.kind === "video") n = s.packetsReceived || 0; }});
      if (n > 0) return performance.now() - t0;
      await new Promise((r) => setTimeout(r, 5));
    }}
  }})();
  const ttff = await new Promise((r) => video.requestVideoFrameCallback(() => r(performance.now() - t0)));
  const connectedMs = await connected;
  const firstPacketMs = await firstPacket;
  // The fixtures' frame counter: 16 cells of 20x16 pixels at the top left, cell i white when
  // bit i of the frame number is set. Counted on every presented frame; a clip loops every 300.
  const canvas = document.createElement("canvas");
  canvas.width = 320; canvas.height = 16;
  const g = canvas.getContext("2d", {{ willReadFrequently: true }});
  const counter = {{ frames: 0, backward: 0, last: -1, done: false, jumps: [] }};
  const onFrame = () => {{
    g.drawImage(video, 0, 0, 320, 16, 0, 0, 320, 16);
    const px = g.getImageData(0, 8, 320, 1).data;
    let n = 0;
    for (let c = 0; c < 16; c++) if (px[(c * 20 + 10) * 4] > 128) n |= 1 << c;
    if (counter.last >= 0 && n < counter.last && !(counter.last >= 250 && n < 50)) {{
      counter.backward++;
      if (counter.jumps.length < 5) counter.jumps.push([counter.last, n]);
    }}
    counter.last = n; counter.frames++;
    if (!counter.done) video.requestVideoFrameCallback(onFrame);
  }};
  video.requestVideoFrameCallback(onFrame);
  const stats = async (kind) => {{
    let v = null;
    (await pc.getStats()).forEach((s) => {{ if (s.type === "inbound-rtp" && s.kind === kind) v = s; }});
    return v || {{}};
  }};
  // STUN responses the browser got on its selected pair (the server answers consent checks).
  const responses = async () => {{
    let n = 0;
    (await pc.getStats()).forEach((s) => {{ if (s.type === "candidate-pair" && s.nominated) n = Math.max(n, s.responsesReceived || 0); }});
    return n;
  }};
  // Measure the 10 s after the start-up second (the first group arrives as a burst).
  await new Promise((r) => setTimeout(r, 1000));
  const a = await stats("video");
  const responsesBefore = await responses();
  await new Promise((r) => setTimeout(r, 10000));
  const b = await stats("video");
  const consentResponses = (await responses()) - responsesBefore;
  const audio = await stats("audio");
  // Sender reports the browser decrypted and read, per kind (what it syncs audio and video by).
  const reports = {{ video: 0, audio: 0 }};
  let srtpCipher = null;
  (await pc.getStats()).forEach((s) => {{
    if (s.type === "remote-outbound-rtp" && s.kind in reports) reports[s.kind] = s.reportsSent || 0;
    if (s.type === "transport") srtpCipher = s.srtpCipher || null;
  }});
  counter.done = true;
  return {{ i, location, ttff, answerMs, connectedMs, firstPacketMs, fps: (b.framesDecoded - a.framesDecoded) / 10, framesDecoded: b.framesDecoded,
           freezeCount: b.freezeCount - (a.freezeCount || 0), freezesAtStart: a.freezeCount || 0, packetsLost: b.packetsLost,
           totalFreezesMs: Math.round((b.totalFreezesDuration - (a.totalFreezesDuration || 0)) * 1000), keyFrames: b.keyFramesDecoded, pli: b.pliCount, nack: b.nackCount, width: b.frameWidth, height: b.frameHeight,
           audioSamples: audio.totalSamplesReceived || 0, audioPackets: audio.packetsReceived || 0,
           videoReports: reports.video, audioReports: reports.audio, consentResponses, srtpCipher,
           counterFrames: counter.frames, counterBackward: counter.backward, counterJumps: counter.jumps,
           state: pc.connectionState }};
}}
Promise.all([...Array({viewers}).keys()].map(viewer))
  .then((r) => fetch("/report", {{ method: "POST", body: JSON.stringify(r) }}))
  .catch((e) => fetch("/report", {{ method: "POST", body: JSON.stringify({{ error: String(e) }}) }}));
</script></body></html>"#
    )
}

/// Serves `html` at `/` and returns the body POSTed to `/report`.
pub fn serve_page(html: String) -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let mut len = 0;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let (ctype, out) = if line.starts_with("POST /report") {
                let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
                ("text/plain", String::new())
            } else {
                ("text/html", html.clone())
            };
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                out.len()
            );
        }
    });
    (port, rx)
}

/// [`serve_page`] in front of a node: `GET /` is `html` and a `POST /report` body is handed
/// over, as there; every other request goes on to the node at `127.0.0.1:upstream` (one request
/// per connection, the answer passed back as it comes) and its request line is added to the
/// returned list. The node's pages so share the test page's origin: the test page can open one
/// in an iframe, read it and drive it as a user would.
pub fn serve_page_before(
    html: String,
    upstream: u16,
) -> (u16, mpsc::Receiver<String>, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (tx, html, seen) = (tx.clone(), html.clone(), seen.clone());
            // A thread each: a WHEP offer may wait seconds for its answer.
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let line = line.trim_end().to_owned();
                let (mut len, mut ctype) = (0, String::new());
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if lower.starts_with("content-type:") {
                        ctype = h.trim_end().to_owned();
                    }
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                let page = |conn: &mut TcpStream, ctype: &str, out: &str| {
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                        out.len()
                    );
                };
                if line.starts_with("POST /report ") {
                    let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
                    page(&mut conn, "text/plain", "");
                } else if line.starts_with("GET / ") {
                    page(&mut conn, "text/html", &html);
                } else if !line.is_empty() {
                    seen.lock().unwrap().push(line.clone());
                    let Ok(mut node) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        return;
                    };
                    let ctype = if ctype.is_empty() {
                        ctype
                    } else {
                        ctype + "\r\n"
                    };
                    let _ = write!(
                        node,
                        "{line}\r\nHost: 127.0.0.1:{upstream}\r\n{ctype}Content-Length: {len}\r\nConnection: close\r\n\r\n"
                    );
                    let _ = node.write_all(&body);
                    let _ = std::io::copy(&mut node, &mut conn);
                }
            });
        }
    });
    (port, rx, requests)
}

/// Headless Chromium with the flags these tests need (see docs/testing.md), on its own
/// profile; the caller adds what it opens.
pub fn chromium_command(profile: &std::path::Path) -> Command {
    let mut c = Command::new("chromium");
    c.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// Headless Chromium on `url` with the flags WebRTC on loopback needs (see docs/testing.md).
pub fn chromium(url: &str, profile: &std::path::Path) -> Proc {
    Proc(
        chromium_command(profile)
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium"),
    )
}

/// One video frame an HTTP-FLV reader got: when it arrived, its presentation time (ms) and
/// whether it is a keyframe.
#[derive(Clone, Copy, Debug)]
pub struct FlvFrame {
    pub arrived: Instant,
    pub pts_ms: i64,
    pub keyframe: bool,
}

/// Plays `path` (`/live/key.flv?…`) from 127.0.0.1:`port` over HTTP-FLV for `read` of wall-clock
/// time; the H.264 frames it got (not sequence headers), stamped on arrival. `None` when it was
/// refused (not a 200).
pub fn read_flv_video(port: u16, path: &str, read: Duration) -> Option<Vec<FlvFrame>> {
    let end = Instant::now() + read;
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    let mut head_done = false;
    // De-chunked FLV bytes and where the next tag starts in them (after the 13-byte header).
    let mut flv = Vec::new();
    let mut at = 13;
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let arrived = Instant::now();
        raw.extend_from_slice(&buf[..n]);
        if !head_done {
            let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            if !raw.starts_with(b"HTTP/1.1 200") {
                return None;
            }
            raw.drain(..i + 4);
            head_done = true;
        }
        // Chunked transfer encoding: `len-hex\r\n data \r\n`.
        while let Some(i) = raw.windows(2).position(|w| w == b"\r\n") {
            let len = std::str::from_utf8(&raw[..i])
                .ok()
                .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                .expect("a chunk length");
            if raw.len() < i + 2 + len + 2 {
                break;
            }
            flv.extend_from_slice(&raw[i + 2..i + 2 + len]);
            raw.drain(..i + 2 + len + 2);
        }
        // FLV tags: type, 3-byte size, 4-byte time, 3-byte stream id, body, 4-byte back pointer.
        while flv.len() >= at + 11 {
            let size = usize::from(flv[at + 1]) << 16
                | usize::from(flv[at + 2]) << 8
                | usize::from(flv[at + 3]);
            if flv.len() < at + 11 + size + 4 {
                break;
            }
            // H.264 (FLV codec 7): AVCPacketType 1 is a frame, 0 the sequence header; then a
            // 24-bit signed composition offset.
            if flv[at] == 9 && size >= 5 && flv[at + 12] == 1 {
                let dts = i64::from(flv[at + 7]) << 24
                    | i64::from(flv[at + 4]) << 16
                    | i64::from(flv[at + 5]) << 8
                    | i64::from(flv[at + 6]);
                let cts =
                    (i32::from_be_bytes([flv[at + 13], flv[at + 14], flv[at + 15], 0]) >> 8) as i64;
                frames.push(FlvFrame {
                    arrived,
                    pts_ms: dts + cts,
                    keyframe: flv[at + 11] >> 4 == 1,
                });
            }
            at += 11 + size + 4;
        }
    }
    Some(frames)
}

/// JavaScript for test pages: `recvonly()` makes a receive-only WHEP viewer's peer connection
/// (video and audio) with a muted, autoplaying `<video>` on the page, and sets its offer once
/// every candidate is gathered (at most 2 s); it resolves to `{ pc, video }`. Pages put it in
/// their `<script>` (a `format!` argument, so its braces are not escaped).
pub const WHEP_RECVONLY_JS: &str = r#"
async function recvonly() {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  const video = document.createElement("video");
  video.muted = true; video.autoplay = true; video.playsInline = true;
  document.body.appendChild(video);
  const stream = new MediaStream();
  video.srcObject = stream;
  pc.ontrack = (e) => stream.addTrack(e.track);
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((r) => {
    if (pc.iceGatheringState === "complete") return r();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && r();
    setTimeout(r, 2000);
  });
  return { pc, video };
}
"#;

/// RTMP, HTTP and WebRTC on the IPv4 wildcard address, as the defaults bind them (free ports).
pub const WILDCARD_V4: [&str; 6] = [
    "--rtmp",
    "0.0.0.0:0",
    "--http",
    "0.0.0.0:0",
    "--webrtc-udp",
    "0.0.0.0:0",
];
