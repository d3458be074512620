//! Writing commands check before they write: what `plan` refuses, `prepare` and `copy` refuse
//! with the same located diagnostics, and the database is exactly as before.

use crate::plan::{fails_as_expected, invalid_fixtures};
use crate::support::{carbot_db, fingerprint, run, status_json};

#[tokio::test]
async fn prepare_and_copy_refuse_what_plan_refuses_and_write_nothing() {
    let url = carbot_db("refuse_invalid").await;
    let before = fingerprint(&url).await;
    let mut failures = Vec::new();
    for f in &invalid_fixtures() {
        for command in ["plan", "prepare", "copy"] {
            if let Err(e) = fails_as_expected(&url, command, f).await {
                failures.push(e);
            }
            let now = fingerprint(&url).await;
            if now != before {
                let added: Vec<&String> = now.iter().filter(|l| !before.contains(l)).collect();
                let gone: Vec<&String> = before.iter().filter(|l| !now.contains(l)).collect();
                failures.push(format!(
                    "{command} {} changed the database: added {added:?}, removed {gone:?}",
                    f.display()
                ));
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A row the profile did not look at (`--profile none`) and green rejects: the copy stops with
/// the green table, the chunk's key range, the column and its expression in the mapping file,
/// without the failing row's values; the chunks copied so far stay done and a re-run stops the
/// same way.
#[tokio::test]
async fn a_row_green_rejects_fails_the_copy_in_the_mapping_s_terms() {
    for (i, (fixture, line, table, column)) in [
        ("not_null_violation", 11, "workshops", "name"),
        ("unmapped_value", 14, "leads", "status"),
    ]
    .into_iter()
    .enumerate()
    {
        let url = carbot_db(&format!("refuse_row_{i}")).await;
        let rel = format!("mappings/invalid/{fixture}.yaml");
        for attempt in 0..2 {
            let out = run(&url, &["copy", "-m", &rel, "--profile", "none"]).await;
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert_eq!(out.status.code(), Some(2), "{err}");
            let head = format!("error[copy-failed]: {rel}:{line}:");
            let diag = err
                .lines()
                .find(|l| l.starts_with(&head))
                .unwrap_or_else(|| panic!("attempt {attempt}: no `{head}` in:\n{err}"));
            assert!(
                diag.contains(&format!("table {table}, column {column}")) && diag.contains("chunk"),
                "{diag}"
            );
            assert!(!err.contains("Failing row contains"), "{err}");
            let st = status_json(&url, &rel).await;
            assert_eq!(st["phase"], "copying", "{st}");
        }
    }
}
