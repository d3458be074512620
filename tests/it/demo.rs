//! `bluegreen demo` end to end, small: every step passes, the summary says 0 writes lost and 0
//! application errors (computed by the demo from both schemas), and nothing is left running,
//! also after Ctrl-C in the middle.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn demo(out: &std::path::Path) -> Command {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin("bluegreen"));
    c.args([
        "demo",
        "--rows",
        "2000",
        "--window",
        "2",
        "--writers",
        "4",
        "--out",
    ])
    .arg(out)
    .stdin(Stdio::null());
    c
}

/// The socket directory the demo's server lived in, from its first step's line.
fn server_dir(stdout: &str) -> PathBuf {
    let rest = stdout
        .split("socket in ")
        .nth(1)
        .unwrap_or_else(|| panic!("no socket line in:\n{stdout}"));
    PathBuf::from(rest.split(')').next().unwrap())
}

fn gone(dir: &std::path::Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let running = Command::new("pgrep")
            .args(["-f", &dir.display().to_string()])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !dir.exists() && !running {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// The run report as a real browser renders it (headless Chromium from the distribution): the
/// timeline's SVG with its panels and the flips, and the verdict, in the rendered DOM, and a
/// screenshot that is not blank. CI installs Chromium and sets BLUEGREEN_REQUIRE_CHROMIUM=1;
/// elsewhere a machine without it only checks the file.
fn rendered_in_a_browser(html: &std::path::Path) {
    let text = std::fs::read_to_string(html).unwrap();
    assert!(
        !text.contains("<script"),
        "the report must not need JavaScript"
    );
    for fetch in ["src=\"http", "href=\"http", "url(http", "@import", "<link"] {
        assert!(
            !text.contains(fetch),
            "the report must not fetch anything ({fetch})"
        );
    }
    let browser = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let Some(browser) = browser else {
        assert!(
            std::env::var("BLUEGREEN_REQUIRE_CHROMIUM").is_err(),
            "BLUEGREEN_REQUIRE_CHROMIUM is set and no Chromium was found"
        );
        eprintln!("demo: no Chromium here: report.html checked as a file only");
        return;
    };
    let url = format!("file://{}", html.display());
    let flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
    ];
    let dom = Command::new(browser)
        .args(flags)
        .args(["--dump-dom", &url])
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    for want in [
        "<svg",
        "rows copied",
        "follower lag",
        "events and validations",
        "cutover ",
        "rollback ",
        ">PASS<",
    ] {
        assert!(
            dom.contains(want),
            "the rendered report lacks {want:?}:\n{}",
            &dom[..dom.len().min(3000)]
        );
    }
    let png = html.with_extension("png");
    let shot = Command::new(browser)
        .args(flags)
        .args([
            "--window-size=1100,1600",
            &format!("--screenshot={}", png.display()),
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    // A blank page of that size compresses to a few kilobytes; the report is tens of them.
    let size = std::fs::metadata(&png).unwrap().len();
    assert!(size > 40_000, "the screenshot looks blank ({size} bytes)");
}

#[test]
fn demo_runs_every_step_loses_nothing_and_leaves_nothing_running() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let run = demo(&out).output().expect("run bluegreen demo");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stdout}\n{stderr}");
    for want in [
        "[12/12] validate at the end: PASS",
        "writes lost          0 ",
        "application errors   0",
        "validate after cutover: PASS",
        "validate after rollback: PASS",
        "\nPASS",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    // Sessions on green wrote, and the writes counted are more than a handful.
    let on_green: u64 = stdout
        .split("committed (")
        .last()
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(on_green > 0, "{stdout}");
    for f in [
        "runbook.md",
        "report/report.md",
        "report/report.json",
        "report/tables.csv",
        "logs/follower.err.log",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let report = std::fs::read_to_string(out.join("report/report.json")).unwrap();
    assert!(report.contains("\"verdict\": \"PASS\""), "{report}");
    rendered_in_a_browser(&out.join("report/report.html"));
    assert!(
        gone(&server_dir(&stdout)),
        "the demo's server is still there"
    );
    // A second run reuses the directory it made; a directory of someone else's is refused.
    let foreign = tmp.path().join("mine");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let refused = demo(&foreign).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);
}

#[test]
fn demo_interrupted_stops_its_server() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let mut child = demo(&out).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    // Read until the copy has started, then Ctrl-C.
    let mut seen = String::new();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    while !seen.contains("[ 4/12]") && !seen.contains("[ 3/12]") {
        use std::io::Read;
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "demo ended early:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        assert!(started.elapsed() < Duration::from_secs(300), "{seen}");
    }
    // SAFETY: a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{seen}");
    assert!(
        gone(&server_dir(&seen)),
        "the demo's server survived Ctrl-C"
    );
}
