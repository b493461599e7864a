//! The command line: bad configuration exits 64 naming the key,
//! before any port is bound; flags, environment and TOML file all configure the node.

mod common;

use std::process::Command;

fn castnode(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_castnode"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_mixer_needs_a_good_mix_and_an_upstream_and_a_mix_is_a_mixers() {
    let dir = common::temp_dir("cli-mixer");
    let token = "0123456789abcdef";
    let up = ["--upstream", "127.0.0.1:4443", "--cluster-token", token];
    let (code, _, err) = castnode(&[&["mixer"][..], &up].concat(), &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--mix"), "{err}");
    let mix = |inputs: &str| {
        format!(
            r#"{{ "name": "m", "output": "live/mix", "width": 1280, "height": 360, "fps": 30,
                 "inputs": [ {{ "broadcast": "live/a", "x": 0, "y": 0, "w": 640, "h": 360 }},
                             {inputs} ] }}"#
        )
    };
    let good = dir.join("good.json");
    std::fs::write(
        &good,
        mix(r#"{ "broadcast": "live/b", "x": 640, "y": 0, "w": 640, "h": 360 }"#),
    )
    .unwrap();
    let odd = dir.join("odd.json");
    std::fs::write(
        &odd,
        mix(r#"{ "broadcast": "live/b", "x": 640, "y": 0, "w": 641, "h": 360 }"#),
    )
    .unwrap();
    let (good, odd) = (good.to_str().unwrap(), odd.to_str().unwrap());
    // A bad mix names the file, the field and what is wrong with it, before anything binds.
    let (code, _, err) = castnode(&[&["mixer"][..], &up, &["--mix", odd]].concat(), &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--mix") && err.contains("odd.json"), "{err}");
    assert!(err.contains("inputs[1].w: odd"), "{err}");
    // From the environment too.
    let (code, _, err) = castnode(&[&["mixer"][..], &up].concat(), &[("CASTNODE_MIX", odd)]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("CASTNODE_MIX") && err.contains("inputs[1].w"),
        "{err}"
    );
    // A mixer needs an upstream (no manager yet); only a mixer takes a mix.
    let (code, _, err) = castnode(&["mixer", "--cluster-token", token, "--mix", good], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("upstream"), "{err}");
    let managed = ["--manager", "http://127.0.0.1:5080", "--mix", good];
    let (code, _, err) = castnode(&[&["mixer"][..], &up, &managed].concat(), &[]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("--manager") && err.contains("not work"),
        "{err}"
    );
    let (code, _, err) = castnode(&[&["edge"][..], &up, &["--mix", good]].concat(), &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--mix") && err.contains("edge"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_transcoder_needs_jobs_and_an_upstream_and_jobs_are_a_transcoders() {
    let token = "0123456789abcdef";
    let (code, _, err) = castnode(&["transcoder", "--cluster-token", token], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--jobs") && err.contains("--manager"), "{err}");
    let jobs = ["--jobs", "live/a", "--cluster-token", token];
    let (code, _, err) = castnode(&[&["transcoder"][..], &jobs].concat(), &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("upstream"), "{err}");
    let up = ["--upstream", "127.0.0.1:4443", "--cluster-token", token];
    let (code, _, err) = castnode(&[&["edge"][..], &up, &["--jobs", "live/a"]].concat(), &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("jobs") && err.contains("edge"), "{err}");
    let (code, _, err) = castnode(
        &[&["transcoder"][..], &up, &["--jobs", "live/a,live/../b"]].concat(),
        &[],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--jobs") && err.contains("live/../b"), "{err}");
}

#[test]
fn cluster_roles_need_upstreams_and_a_token() {
    let (code, _, err) = castnode(&["relay", "--cluster-token", "0123456789abcdef"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("upstream"), "{err}");
    let (code, _, err) = castnode(&["origin"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("cluster-token"), "{err}");
    let (code, _, err) = castnode(
        &[
            "edge",
            "--upstream",
            "nohost",
            "--cluster-token",
            "0123456789abcdef",
        ],
        &[],
    );
    assert_eq!(code, 64);
    assert!(
        err.contains("upstream") && err.contains("HOST:PORT"),
        "{err}"
    );
}

#[test]
fn bad_values_exit_64_naming_the_key() {
    let (code, _, err) = castnode(&["standalone", "--max-message-bytes", "12"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("max-message-bytes"), "{err}");
    let (code, _, err) = castnode(&["standalone", "--rtmp", "not-an-address"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("--rtmp"), "{err}");
    let (code, _, err) = castnode(&["standalone"], &[("CASTNODE_HTTP", "nowhere")]);
    assert_eq!(code, 64);
    assert!(err.contains("--http"), "{err}");
    let (code, _, err) = castnode(&["frobnicate"], &[]);
    assert_eq!(code, 64, "{err}");
    let (code, out, _) = castnode(&["--help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("standalone"));
}

#[test]
fn toml_file_is_read_and_checked() {
    let dir = common::temp_dir("cli");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "rtmp = \"127.0.0.1:0\"\nplayer-batch-msec = 3\n").unwrap();
    let (code, _, err) = castnode(&["standalone", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("player-batch-msec"), "{err}");
    std::fs::write(&bad, "publish-grace = \"soon\"\n").unwrap();
    let (code, _, err) = castnode(&["standalone", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("publish-grace"), "{err}");
    let (code, _, err) = castnode(
        &["standalone", "--config", "/nonexistent/castnode.toml"],
        &[],
    );
    assert_eq!(code, 64);
    assert!(err.contains("config"), "{err}");

    // A good file configures the node: the RTMP port it names is the one served.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        format!("rtmp = \"127.0.0.1:{port}\"\npublic-host = \"example.test\"\n"),
    )
    .unwrap();
    let mut child = common::Proc(
        Command::new(env!("CARGO_BIN_EXE_castnode"))
            .args([
                "standalone",
                "--http",
                "127.0.0.1:0",
                "--webrtc-udp",
                "127.0.0.1:0",
                "--config",
                good.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut banner = String::new();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.0.stdout.take().unwrap()).lines();
    while !banner.contains("Metrics") {
        banner.push_str(&lines.next().unwrap().unwrap());
        banner.push('\n');
    }
    assert!(
        banner.contains(&format!("rtmp://example.test:{port}/live")),
        "{banner}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}

#[test]
fn a_bad_ladder_rung_exits_64_naming_the_rung() {
    let dir = common::temp_dir("cli-ladder");
    let file = dir.join("ladders.toml");
    std::fs::write(
        &file,
        "[ladders.mobile]\nrungs = [\n  { name = \"720p\", height = 720, bitrate-kbps = 2500 },\n  \
         { name = \"360p\", height = 361, bitrate-kbps = 700 },\n]\n",
    )
    .unwrap();
    let config = file.to_str().unwrap();
    // Refused before the role is even looked at.
    for role in ["standalone", "transcoder"] {
        let (code, _, err) = castnode(&[role, "--config", config], &[]);
        assert_eq!(code, 64, "{role}: {err}");
        assert!(
            err.contains("ladders") && err.contains("rung \"360p\": odd size 361"),
            "{role}: {err}"
        );
    }
    let (code, _, err) = castnode(&["standalone", "--ladder", "nope"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--ladder") && err.contains("nope"), "{err}");
    let (code, _, err) = castnode(&["standalone"], &[("CASTNODE_LADDER", "nope")]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("CASTNODE_LADDER"), "{err}");
}

#[test]
fn help_gives_each_role_its_own_defaults() {
    let (code, out, _) = castnode(&["manager", "--help"], &[]);
    assert_eq!(code, 0);
    let http = out
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("--http"))
        .take(3)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        http.contains("0.0.0.0:5080") && !http.contains("8080"),
        "manager --help, --http:\n{http}"
    );
    let (code, out, _) = castnode(&["standalone", "--help"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("0.0.0.0:8080") && !out.contains("5080"),
        "{out}"
    );
}

#[test]
fn listen_addresses_take_host_names() {
    let name = ["--http", "localhost:0", "--rtmp", "localhost:0"];
    let udp = ["--webrtc-udp", "localhost:0"];
    let mut node = common::Server::start_role("standalone", &[&name[..], &udp[..]].concat());
    assert!(node.rtmp_port > 0 && node.http_port > 0, "{}", node.log());
    assert_eq!(node.get("/healthz").0, 200);
    assert!(std::net::TcpStream::connect(("127.0.0.1", node.rtmp_port)).is_ok());
    assert!(node.stop(std::time::Duration::from_secs(10)));
    // The manager's --http, and --cluster.
    let token = ["--cluster-token", "0123456789abcdef"];
    let manager = common::Server::start_role("manager", &[&token[..], &name[..2]].concat());
    assert_eq!(manager.get("/healthz").0, 200, "{}", manager.log());
    let origin = common::Server::start_role(
        "origin",
        &[&token[..], &["--cluster", "localhost:0"]].concat(),
    );
    assert!(origin.cluster_port > 0, "{}", origin.log());
    // A name that does not resolve is refused before anything is bound, naming the flag.
    for flag in ["--rtmp", "--http", "--webrtc-udp", "--cluster"] {
        let (code, _, err) = castnode(
            &[
                "origin",
                token[0],
                token[1],
                flag,
                "no-such-host.invalid:1935",
            ],
            &[],
        );
        assert_eq!(code, 64, "{flag}: {err}");
        assert!(
            err.contains(flag) && err.contains("no-such-host.invalid"),
            "{flag}: {err}"
        );
    }
}

#[test]
fn a_bad_value_names_where_it_came_from() {
    let (code, _, err) = castnode(&["standalone"], &[("CASTNODE_MAX_VIEWERS", "abc")]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("CASTNODE_MAX_VIEWERS"), "{err}");
    let (code, _, err) = castnode(&["standalone", "--max-viewers", "abc"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("--max-viewers") && !err.contains("CASTNODE_MAX_VIEWERS"),
        "{err}"
    );
    // Values that parse but are refused by the checks after parsing.
    let (code, _, err) = castnode(&["standalone"], &[("CASTNODE_MAX_MESSAGE_BYTES", "12")]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("CASTNODE_MAX_MESSAGE_BYTES"), "{err}");
    let dir = common::temp_dir("cli-source");
    let file = dir.join("bad.toml");
    std::fs::write(&file, "max-viewers = \"abc\"\n").unwrap();
    let (code, _, err) = castnode(&["standalone", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("max-viewers") && err.contains("bad.toml"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `role` in an empty working directory with `home` as HOME and `XDG_DATA_HOME` unset,
/// stops it, and returns what it left in the working directory.
fn left_in_cwd(role: &str, extra: &[&str], home: &std::path::Path) -> Vec<String> {
    let cwd = home.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let mut node = common::Server::start_role_with(role, extra, |c| {
        c.current_dir(&cwd)
            .env("HOME", home)
            .env_remove("XDG_DATA_HOME")
            .env_remove("CASTNODE_DB")
            .env_remove("CASTNODE_DATA_DIR");
    });
    assert_eq!(node.get("/healthz").0, 200, "{}", node.log());
    assert!(
        node.stop(std::time::Duration::from_secs(10)),
        "{}",
        node.log()
    );
    std::fs::read_dir(&cwd)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn nothing_is_left_in_the_working_directory() {
    let home = common::temp_dir("cli-home");
    let left = left_in_cwd("standalone", &[], &home);
    assert!(left.is_empty(), "standalone left {left:?}");
    let left = left_in_cwd("manager", &["--cluster-token", "0123456789abcdef"], &home);
    assert!(left.is_empty(), "manager left {left:?}");
    // The manager's state is in the platform's data directory.
    let db = home.join(".local/share/castnode/manager.db");
    assert!(db.exists(), "no {}", db.display());
    let _ = std::fs::remove_dir_all(&home);
}

/// The repository stands on its own: no tracked file points outside it.
#[test]
fn no_tracked_file_points_outside_the_repository() {
    let root = env!("CARGO_MANIFEST_DIR");
    let Ok(out) = Command::new("git")
        .args(["-C", root, "ls-files", "-z"])
        .output()
    else {
        eprintln!("SKIPPED: git is not installed");
        return;
    };
    if !out.status.success() {
        eprintln!("SKIPPED: not a git checkout");
        return;
    }
    let needle = concat!("..", "/shared").as_bytes();
    let bad: Vec<String> = out
        .stdout
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .filter(|p| {
            std::fs::read(std::path::Path::new(root).join(p))
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "files that point outside the repository: {bad:?}"
    );
}
