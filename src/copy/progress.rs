//! Copy progress: an indicatif bar per green table on a terminal (rows, rows/s, ETA in chunks),
//! one log line per chunk otherwise. Drawn on stderr; stdout stays for results.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use sqlx::PgConnection;

use crate::diag::Diagnostic;
use crate::mapping::Mapping;

pub struct Progress {
    bars: BTreeMap<String, ProgressBar>,
    counts: Mutex<BTreeMap<String, (u64, u64, u64)>>,
    tty: bool,
    _multi: Option<MultiProgress>,
}

impl Progress {
    /// Per table: chunks done, chunks in all, rows copied so far (from the ledger).
    pub async fn new(conn: &mut PgConnection, m: &Mapping) -> Result<Progress, Diagnostic> {
        let rows = crate::control::chunks::progress(conn, m).await?;
        let tty = std::io::stderr().is_terminal();
        let multi = tty.then(MultiProgress::new);
        let mut bars = BTreeMap::new();
        let mut counts = BTreeMap::new();
        for r in rows {
            let t = r.green_table;
            let (done, total, copied) = (r.done as u64, r.total as u64, r.rows as u64);
            if let Some(mp) = &multi {
                let b = mp.add(ProgressBar::new(total));
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>20} [{bar:30}] {pos}/{len} chunks  {msg}  eta {eta}",
                    )
                    .expect("template")
                    .progress_chars("=> "),
                );
                b.set_prefix(t.clone());
                b.set_position(done);
                b.set_message(format!("{copied} rows"));
                bars.insert(t.clone(), b);
            }
            counts.insert(t, (done, total, copied));
        }
        Ok(Progress {
            bars,
            counts: Mutex::new(counts),
            tty,
            _multi: multi,
        })
    }

    pub fn chunk_done(&self, table: &str, rows: u64) {
        let mut counts = self.counts.lock().expect("progress lock");
        let c = counts.entry(table.to_string()).or_insert((0, 0, 0));
        c.0 += 1;
        c.2 += rows;
        if self.tty {
            if let Some(b) = self.bars.get(table) {
                b.set_position(c.0);
                let rate = b.per_sec();
                b.set_message(format!("{} rows ({:.0} chunks/s)", c.2, rate));
            }
        } else {
            eprintln!(
                "bluegreen: {table}: chunk {}/{} done, {rows} rows ({} so far)",
                c.0, c.1, c.2
            );
        }
    }

    pub fn finish(&self) {
        for b in self.bars.values() {
            b.finish();
        }
    }
}
