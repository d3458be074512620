//! A throwaway PostgreSQL cluster for tests and `demo`: `initdb` into a short temp directory, a
//! Unix socket only (no TCP port to collide on), durability off (fsync, synchronous_commit,
//! full_page_writes), stopped and removed when its owner drops it, exits or is killed.
//!
//! The last point is the watchdog's job: a detached `sh` child that blocks reading a pipe whose
//! write end only the owner holds. When the owner process dies for any reason (including kill -9,
//! or a test binary whose statics are never dropped), the kernel closes the pipe, the read returns,
//! and the watchdog runs `pg_ctl stop -m immediate` and removes the directory.
//!
//! PostgreSQL refuses to run as root: when the effective uid is 0 every server binary is run as the
//! `postgres` user through `runuser`, after handing it the directory.

use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use anyhow::{Context, Result, bail};

/// The role name of the superuser in a throwaway cluster.
pub const SUPERUSER: &str = "postgres";
/// A role that must log in with a password (for tests of authentication errors).
pub const PASSWORD_ROLE: &str = "bluegreen_pw";

pub struct Cluster {
    dir: PathBuf,
    bindir: PathBuf,
    run_as: Option<String>,
    watchdog: Option<(Child, ChildStdin)>,
    stopped: bool,
}

/// Where the PostgreSQL server binaries are: `pg_config --bindir` when its `initdb` exists, else
/// the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("BLUEGREEN_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).context(
        "no PostgreSQL server binaries found (looked at `pg_config --bindir` and /usr/lib/postgresql/*/bin); \
         install them, e.g. `apt-get install postgresql`, or set BLUEGREEN_PG_BINDIR",
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn chown_to(path: &Path, user: &str) -> Result<()> {
    let name = CString::new(user)?;
    // SAFETY: getpwnam reads a NUL-terminated name; the returned record is only read here, at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("user `{user}` does not exist: PostgreSQL cannot run as root, and needs that user");
    }
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    let cpath = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid path and ids; the result is checked.
    if unsafe { libc::chown(cpath.as_ptr(), uid, gid) } != 0 {
        bail!(
            "chown {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl Cluster {
    /// initdb, start, and arm the watchdog. Takes about two seconds.
    pub fn start() -> Result<Cluster> {
        let bindir = find_bindir()?;
        let run_as = is_root().then(|| SUPERUSER.to_string());
        // A short path: socket paths are limited to about 100 bytes.
        let dir = tempfile::Builder::new()
            .prefix("bg.")
            .tempdir_in("/tmp")
            .context("creating a temp dir for the cluster")?
            .keep();
        let mut cluster = Cluster {
            dir,
            bindir,
            run_as,
            watchdog: None,
            stopped: false,
        };
        if let Some(user) = &cluster.run_as {
            chown_to(&cluster.dir, user)?;
        }
        // Arm the watchdog first, so even a failed start is cleaned up.
        cluster.arm_watchdog()?;
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--auth-local=trust",
            ],
        )?;
        // The superuser connects without a password; every other role must give one, so that
        // authentication failures can be tested for real.
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all {SUPERUSER} trust\nlocal all all scram-sha-256\n"),
        )?;
        let opts = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
             -c shared_buffers=256MB -c max_wal_size=4GB -c password_encryption=scram-sha-256 \
             -c log_line_prefix='%m [%p] db=%d '",
            cluster.dir.display()
        );
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                cluster.dir.join("server.log").to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory holding the Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost/{database}?host={}",
            self.dir.display()
        )
    }

    /// A connection URL for `database` as `user` with `password`.
    pub fn url_with_password(&self, database: &str, user: &str, password: &str) -> String {
        format!(
            "postgres://{user}:{password}@localhost/{database}?host={}",
            self.dir.display()
        )
    }

    /// The server log, for diagnosing a failed test.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bindir.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        Ok(())
    }

    fn arm_watchdog(&mut self) -> Result<()> {
        let stop = {
            let c = self.command("pg_ctl");
            let mut parts = vec![c.get_program().to_string_lossy().into_owned()];
            parts.extend(c.get_args().map(|a| a.to_string_lossy().into_owned()));
            parts.join(" ")
        };
        let script = format!(
            "read _ignored; {stop} -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            data = self.data_dir().display(),
            dir = self.dir.display()
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own session: a Ctrl-C to the owner's process group must not take the watchdog too.
        // SAFETY: setsid is async-signal-safe and only affects the child.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("starting the cluster watchdog")?;
        let stdin = child.stdin.take().unwrap();
        self.watchdog = Some((child, stdin));
        Ok(())
    }

    /// Leave the server running after this process ends (`demo --keep`): the watchdog is
    /// disarmed. Returns the shell command that stops the server and removes its directory.
    pub fn keep(&mut self) -> String {
        if let Some((mut child, stdin)) = self.watchdog.take() {
            // Killed while it waits on the pipe, so closing the pipe stops nothing.
            let _ = child.kill();
            let _ = child.wait();
            drop(stdin);
        }
        self.stopped = true;
        let c = self.command("pg_ctl");
        let mut parts = vec![c.get_program().to_string_lossy().into_owned()];
        parts.extend(c.get_args().map(|a| a.to_string_lossy().into_owned()));
        format!(
            "{} -D '{}' -m fast stop && rm -rf '{}'",
            parts.join(" "),
            self.data_dir().display(),
            self.dir.display()
        )
    }

    /// Stop the server now and remove its directory.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if let Some((mut child, mut stdin)) = self.watchdog.take() {
            let _ = stdin.write_all(b"stop\n");
            drop(stdin);
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
