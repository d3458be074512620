//! How copy and validate split a table into chunks: key ranges between quantiles of the data (a
//! separate chunk for NULL keys), or physical page ranges for a table without a usable key; and
//! the SQL of each range, of the quantile query and of the chunk ledger, rendered once so the
//! statements `plan` prints are the statements that run. Pure.

use crate::catalog;
use crate::mapping::TableEntry;
use crate::sql::scan::referenced_aliases;
use crate::sql::{Ident, Sql, sql};

/// The `key_type` the ledger records for physical (ctid) chunks.
pub const PHYSICAL_KEY_TYPE: &str = "tid";

/// One chunk: keys in `[lower, upper)` (an open end where `None`), or the NULL keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub lower: Option<String>,
    pub upper: Option<String>,
    pub null_keys: bool,
}

/// How many chunks of about `chunk_rows` rows an estimated `rows` makes (at least one).
pub fn count(rows: f64, chunk_rows: u64) -> usize {
    ((rows.max(0.0) / chunk_rows.max(1) as f64).ceil() as usize).max(1)
}

/// A key column whose `pg_stats.correlation` is below this (in absolute value) is in no useful
/// order on its heap: a range of it has rows on nearly every page.
pub const SCATTERED_CORRELATION: f64 = 0.9;

/// Chunks over a scattered key hold up to this many rows (or `chunk_rows`, when more): fewer
/// chunks read the heap fewer times, but a chunk is one transaction (copy) or one snapshot
/// (validate), and a long one keeps vacuum from the dead rows of every table, the change log's
/// among them (rule M1; validate moves to a fresh snapshot only between chunks). A million rows
/// took about 10 s to copy and 15 s to validate at 10 M leads here.
pub const SCATTERED_CHUNK_ROWS: u64 = 1_000_000;

/// At least this many chunks over a scattered key (rounded up to a multiple of the jobs, so no
/// job is left alone with the last one).
pub const SCATTERED_CHUNKS: usize = 4;

/// Whether ranges of a key column are scattered over a heap that does not stay in the buffer
/// cache (more than half of `cache_bytes`, the server's `shared_buffers`): then each range's
/// bitmap heap scan reads nearly every page again, from outside shared buffers, and N chunks
/// read the heap about N times (measured at 10 M leads over a uuid key: 102 chunks of 100,000
/// rows each touched 88,000 of 380,000 pages, the heap read 23 times over). Unknown statistics
/// (never analysed) are not scattered.
pub fn scattered(correlation: Option<f64>, heap_bytes: i64, cache_bytes: i64) -> bool {
    correlation.is_some_and(|c| c.abs() < SCATTERED_CORRELATION) && heap_bytes > cache_bytes / 2
}

/// [`scattered`] for column `column` of `t` (`false` for a column `t` lacks).
pub fn scattered_column(t: &catalog::Table, column: &str, cache_bytes: i64) -> bool {
    t.column(column)
        .is_some_and(|c| scattered(c.correlation, t.heap_bytes, cache_bytes))
}

/// [`scattered_column`] for a chunk key: `false` unless it is a plain column of `alias`, the
/// driving table `t`.
pub fn scattered_key(key: &str, alias: &str, t: &catalog::Table, cache_bytes: i64) -> bool {
    crate::plan::keys::plain_column_of(key, alias)
        .is_some_and(|c| scattered_column(t, &c, cache_bytes))
}

/// How many chunks to plan: `count`, but over a scattered key chunks of up to
/// `SCATTERED_CHUNK_ROWS`, at least `SCATTERED_CHUNKS`, a multiple of `jobs`: the heap is read
/// once per chunk, so as few as keep each chunk's transaction short.
pub fn planned_count(rows: f64, chunk_rows: u64, jobs: u32, scattered: bool) -> usize {
    let n = count(rows, chunk_rows);
    if !scattered {
        return n;
    }
    let jobs = (jobs as usize).max(1);
    let large = count(rows, chunk_rows.max(SCATTERED_CHUNK_ROWS)).max(SCATTERED_CHUNKS);
    n.min(large.div_ceil(jobs) * jobs)
}

/// Ranges between the quantile `bounds` (as the server returned them, in order; repeated values
/// collapse), covering every non-NULL key exactly once, then one range for NULL keys.
pub fn key_ranges(bounds: Vec<Option<String>>) -> Vec<Range> {
    let mut uniq: Vec<String> = Vec::new();
    for b in bounds.into_iter().flatten() {
        if uniq.last() != Some(&b) && !uniq.contains(&b) {
            uniq.push(b);
        }
    }
    let mut out = Vec::new();
    let mut lower = None;
    for b in uniq {
        out.push(Range {
            lower: lower.replace(b.clone()),
            upper: Some(b),
            null_keys: false,
        });
    }
    out.push(Range {
        lower,
        upper: None,
        null_keys: false,
    });
    out.push(Range {
        lower: None,
        upper: None,
        null_keys: true,
    });
    out
}

/// About `n` ranges of heap pages `(p,0)` over a table of `pages` pages; the last is open, so rows
/// on pages added meanwhile are covered too.
pub fn physical_ranges(pages: i64, n: usize) -> Vec<Range> {
    let step = (pages / n.max(1) as i64).max(1);
    let tid = |p: i64| format!("({p},0)");
    let mut out = Vec::new();
    let mut lower = None;
    let mut p = step;
    while p < pages {
        out.push(Range {
            lower: lower.replace(tid(p)),
            upper: Some(tid(p)),
            null_keys: false,
        });
        p += step;
    }
    out.push(Range {
        lower,
        upper: None,
        null_keys: false,
    });
    out
}

/// The condition selecting `range` of `key` (an SQL expression). `bound` renders a bound value:
/// a typed literal where the statement runs, `$1` / `$2` where `plan` prints it.
pub fn condition(key: &str, range: &Range, bound: impl Fn(&str) -> String) -> String {
    if range.null_keys {
        return format!("({key}) IS NULL");
    }
    let mut c = vec![format!("({key}) IS NOT NULL")];
    if let Some(l) = &range.lower {
        c.push(format!("({key}) >= {}", bound(l)));
    }
    if let Some(u) = &range.upper {
        c.push(format!("({key}) < {}", bound(u)));
    }
    c.join(" AND ")
}

/// The condition of a bounded range as `plan` prints it: `$1` and `$2` for the bounds.
pub fn printed_condition(key: &str) -> String {
    let placeholders = Range {
        lower: Some("$1".into()),
        upper: Some("$2".into()),
        null_keys: false,
    };
    condition(key, &placeholders, str::to_string)
}

/// The quantile boundaries of `key` over `source` (a FROM list, with its WHERE): `$1` is the
/// number of chunks wanted; returns `$1 - 1` values as text, in order.
pub fn quantile_query(key: &str, source: &str) -> Sql {
    sql!(
        "SELECT percentile_disc(ARRAY(SELECT g::float8 / $1::int FROM generate_series(1, $1::int - 1) AS g ORDER BY g)) WITHIN GROUP (ORDER BY ({key}))::text[] FROM {source}"
    )
}

/// What the quantiles of `key` are taken over: the driving table alone when the key reads only
/// it and the entry has no `where` (cheaper), else the entry's whole `from` with its `where`.
pub fn quantile_source(e: &TableEntry, driving: &catalog::Table, key: &str) -> String {
    let d = e.from_clause.driving();
    let aliases = e.from_clause.aliases();
    if referenced_aliases(key, &aliases) == [d.alias.as_str()] && e.where_.is_none() {
        format!("{} AS {}", driving.qname(), Ident::new(&d.alias))
    } else {
        format!(
            "{}{}",
            e.from_clause.render(),
            super::query::where_clause(e, &[])
        )
    }
}

/// Claim the next pending chunk of migration `$1` (several processes share the ledger).
pub fn claim_query(chunks: &crate::sql::QName) -> Sql {
    sql!(
        "SELECT green_table, chunk_no, key_sql, key_type, lower_bound, upper_bound, null_keys FROM {chunks} WHERE migration = $1 AND state = 'pending' ORDER BY green_table, chunk_no LIMIT 1 FOR UPDATE SKIP LOCKED"
    )
}

/// Mark chunk (`$1` migration, `$2` table, `$3` number) done with `$4` rows, in the transaction
/// that copied it.
pub fn done_statement(chunks: &crate::sql::QName) -> Sql {
    sql!(
        "UPDATE {chunks} SET state = 'done', rows_copied = $4, done_at = now() WHERE migration = $1 AND green_table = $2 AND chunk_no = $3"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    /// Which range a key falls in, by the rules `condition` renders (text keys compared as
    /// numbers here).
    fn covering(ranges: &[Range], key: Option<i64>) -> Vec<usize> {
        let num = |b: &Option<String>| b.as_ref().map(|v| v.parse::<i64>().unwrap());
        (0..ranges.len())
            .filter(|&i| {
                let r = &ranges[i];
                match key {
                    None => r.null_keys,
                    Some(k) => {
                        !r.null_keys
                            && num(&r.lower).is_none_or(|l| k >= l)
                            && num(&r.upper).is_none_or(|u| k < u)
                    }
                }
            })
            .collect()
    }

    #[test]
    fn key_ranges_are_disjoint_cover_every_key_and_none_is_empty_of_bounds() {
        let ranges = key_ranges(vec![s("10"), s("20"), s("20"), None, s("30")]);
        assert_eq!(ranges.len(), 5, "{ranges:?}");
        for k in [i64::MIN, -5, 9, 10, 19, 20, 29, 30, 31, i64::MAX] {
            assert_eq!(covering(&ranges, Some(k)).len(), 1, "key {k}");
        }
        assert_eq!(covering(&ranges, None).len(), 1);
        // Bounded ranges are never empty intervals.
        for r in &ranges {
            if let (Some(l), Some(u)) = (&r.lower, &r.upper) {
                assert!(l.parse::<i64>().unwrap() < u.parse::<i64>().unwrap());
            }
        }
        // No quantiles (a small table): one range for all keys, one for NULL.
        let one = key_ranges(Vec::new());
        assert_eq!(one.len(), 2);
        assert_eq!(covering(&one, Some(7)), [0]);
        assert_eq!(covering(&one, None), [1]);
    }

    #[test]
    fn physical_ranges_cover_every_page() {
        let ranges = physical_ranges(10, 3);
        let page = |v: &Option<String>| {
            v.as_ref()
                .map(|t| t[1..t.find(',').unwrap()].parse::<i64>().unwrap())
        };
        for p in 0..20 {
            let n = ranges
                .iter()
                .filter(|r| {
                    page(&r.lower).is_none_or(|l| p >= l) && page(&r.upper).is_none_or(|u| p < u)
                })
                .count();
            assert_eq!(n, 1, "page {p} in {ranges:?}");
        }
        assert_eq!(physical_ranges(0, 4).len(), 1);
    }

    #[test]
    fn conditions_render_bounds_through_the_caller() {
        let r = Range {
            lower: s("a'b"),
            upper: None,
            null_keys: false,
        };
        let lit = |v: &str| format!("{}::text", crate::sql::Literal::new(v));
        assert_eq!(
            condition("l.id", &r, lit),
            "(l.id) IS NOT NULL AND (l.id) >= 'a''b'::text"
        );
        assert_eq!(
            printed_condition("l.id"),
            "(l.id) IS NOT NULL AND (l.id) >= $1 AND (l.id) < $2"
        );
        let nulls = Range {
            lower: None,
            upper: None,
            null_keys: true,
        };
        assert_eq!(condition("k", &nulls, lit), "(k) IS NULL");
        assert_eq!(count(250_000.0, 100_000), 3);
        assert_eq!(count(-1.0, 100_000), 1);
    }

    #[test]
    fn a_scattered_key_over_a_heap_larger_than_the_cache_gets_few_chunks() {
        let gib = 1 << 30;
        // A random uuid over 3.5 GB with 1 GB of shared buffers.
        assert!(scattered(Some(0.004), 3 * gib + gib / 2, gib));
        assert!(scattered(Some(-0.3), 3 * gib, gib));
        // In heap order, or small enough to stay cached, or never analysed: as before.
        assert!(!scattered(Some(0.99), 3 * gib, gib));
        assert!(!scattered(Some(-0.95), 3 * gib, gib));
        assert!(!scattered(Some(0.0), gib / 2, gib));
        assert!(!scattered(None, 3 * gib, gib));
        // Chunks of a million rows, at least 4, a multiple of the jobs; never more than
        // chunk_rows asks for.
        assert_eq!(planned_count(10_000_000.0, 100_000, 2, true), 10);
        assert_eq!(planned_count(10_000_000.0, 100_000, 3, true), 12);
        assert_eq!(planned_count(10_000_000.0, 100_000, 16, true), 16);
        assert_eq!(planned_count(1_000_000.0, 10_000, 2, true), 4);
        assert_eq!(planned_count(1_000_000.0, 10_000, 3, true), 6);
        assert_eq!(planned_count(1_000_000.0, 10_000, 1, true), 4);
        assert_eq!(planned_count(250_000.0, 100_000, 2, true), 3);
        assert_eq!(planned_count(10_000_000.0, 5_000_000, 2, true), 2);
        assert_eq!(planned_count(10_000_000.0, 100_000, 2, false), 100);
    }
}
