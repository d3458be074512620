//! `report.html`: the run report a person would rather look at than read the logs. One
//! self-contained file (inline CSS and SVG, no JavaScript, nothing fetched): the verdict first,
//! the migration's timeline drawn with plotters (rows copied, change-log backlog and follower
//! lag, each event with the write-block time of the flips, the validations), then per table the
//! counts and digests, the differences, the checks and the query budgets.

use std::fmt::Write as _;

use plotters::prelude::*;

use super::report::{Report, Verdict};
use super::timeline::Timeline;

/// HTML text with `<`, `>`, `&` and quotes escaped.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

const CSS: &str = "body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1000px;color:#1d2733;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
.verdict{font-size:2rem;font-weight:700;padding:.6rem 1rem;border-radius:6px;display:inline-block;margin:.5rem 0}
.PASS{background:#dafbe1;color:#116329}.FAIL{background:#ffebe9;color:#a40e26}
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:.8rem;word-break:break-all}
.ok{color:#116329;font-weight:600}.bad{color:#a40e26;font-weight:600}.muted{color:#57606a}
figure{margin:0}svg{max-width:100%;height:auto;border:1px solid #d0d7de;border-radius:6px}";

/// The whole page.
pub fn render(r: &Report, t: &Timeline) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>bluegreen report: {mig} {v}</title><style>{CSS}</style></head><body>\n",
        mig = esc(&r.migration),
        v = r.verdict
    );
    let _ = write!(
        o,
        "<h1>Migration <code>{}</code></h1>\n<div class=\"verdict {v}\">{v}</div>\n<p>{}</p>\n",
        esc(&r.migration),
        if r.verdict == Verdict::Pass {
            "Every table matches and every check passes."
        } else {
            "Something differs or a check failed: see below."
        },
        v = r.verdict
    );
    let _ = writeln!(
        o,
        "<p class=\"muted\">Phase <b>{}</b>. Validated by {} at {} on database <code>{}</code> (PostgreSQL {}), snapshot LSN {}. Mapping <code>{}</code>, blake3 <code>{}</code>. Report digest <code>{}</code>.</p>",
        r.phase,
        esc(&r.ran_by),
        esc(&r.ran_at),
        esc(&r.database),
        esc(&r.server_version),
        esc(&r.snapshot_lsn),
        esc(&r.mapping_file),
        esc(&r.mapping_digest),
        esc(&r.report_digest)
    );
    let _ = write!(
        o,
        "<h2>Timeline</h2>\n<figure>{}</figure>\n",
        timeline_svg(t)
    );
    o.push_str(&event_table(t));
    o.push_str("<h2>Tables</h2>\n<table><tr><th>table</th><th>verdict</th><th>blue rows</th><th>green rows</th><th>blue digest</th><th>green digest</th><th>missing</th><th>extra</th><th>duplicated</th><th>changed</th></tr>\n");
    for x in &r.tables {
        let verdict = if x.not_compared {
            "<span class=\"muted\">not compared after cutover</span>".to_string()
        } else if x.matches {
            "<span class=\"ok\">match</span>".to_string()
        } else {
            "<span class=\"bad\">DIFFERS</span>".to_string()
        };
        let reverse = x
            .reverse
            .as_ref()
            .filter(|rr| !rr.matches)
            .map(|rr| {
                format!(
                    "<br><span class=\"bad\">{} reverse failure(s)</span>",
                    rr.failed
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{verdict}{reverse}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td><code>{}</code></td><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&x.table),
            x.blue_rows,
            x.green_rows,
            esc(&short(&x.blue_digest)),
            esc(&short(&x.green_digest)),
            x.missing,
            x.extra,
            x.duplicated,
            x.changed
        );
    }
    o.push_str("</table>\n");
    let _ = write!(
        o,
        "<h2>Differences</h2>\n<p>{} found, {} shown{}.</p>\n",
        r.differences_total,
        r.differences_shown,
        if r.values_shown {
            ""
        } else {
            "; values masked (validate --show-values shows them)"
        }
    );
    if !r.differences.is_empty() {
        o.push_str("<table><tr><th>table</th><th>kind</th><th>key</th><th>columns</th><th>expected</th><th>found</th></tr>\n");
        for d in r.differences.iter().take(200) {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
                esc(&d.table),
                esc(d.kind.as_str()),
                esc(&d.key),
                esc(&d.columns.join(", ")),
                esc(d.expected.as_deref().unwrap_or("(masked)")),
                esc(d.found.as_deref().unwrap_or("(masked)"))
            );
        }
        o.push_str("</table>\n");
    }
    o.push_str("<h2>Checks</h2>\n");
    if r.checks.is_empty() {
        o.push_str("<p class=\"muted\">No checks file.</p>\n");
    } else {
        o.push_str(
            "<table><tr><th>check</th><th>result</th><th>value</th><th>expected</th></tr>\n",
        );
        for c in &r.checks {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td><code>{}</code>{}</td></tr>",
                esc(&c.name),
                if c.skipped {
                    "<span class=\"muted\">skipped</span>"
                } else {
                    pass(c.passed)
                },
                esc(&c.value),
                esc(&c.expect),
                c.error
                    .as_deref()
                    .map(|e| format!("<br><span class=\"bad\">{}</span>", esc(e)))
                    .unwrap_or_default()
            );
        }
        o.push_str("</table>\n");
    }
    if !r.performance.is_empty() {
        o.push_str("<h2>Query budgets</h2>\n<table><tr><th>query</th><th>result</th><th>budget</th><th>p50</th><th>p95</th><th>blue p50</th></tr>\n");
        for b in &r.performance {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td class=\"num\">{:.1} ms</td><td class=\"num\">{:.1} ms</td><td class=\"num\">{:.1} ms</td><td class=\"num\">{}</td></tr>",
                esc(&b.name),
                pass(b.passed),
                b.budget_ms,
                b.p50_ms,
                b.p95_ms,
                b.blue_p50_ms
                    .map(|v| format!("{v:.1} ms"))
                    .unwrap_or_default()
            );
        }
        o.push_str("</table>\n");
    }
    o.push_str("<p class=\"muted\">Written by bluegreen validate --report; report.json holds the same content for tools.</p>\n</body></html>\n");
    o
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "<span class=\"ok\">pass</span>"
    } else {
        "<span class=\"bad\">FAIL</span>"
    }
}

fn short(digest: &str) -> String {
    digest.chars().take(16).collect()
}

/// The events as a table under the drawing (the drawing's labels are short).
fn event_table(t: &Timeline) -> String {
    if t.events.is_empty() {
        return String::new();
    }
    let mut o = format!(
        "<table><tr><th>t (s since {} UTC)</th><th>command</th><th>outcome</th><th>writes blocked</th></tr>\n",
        esc(&t.origin)
    );
    for e in &t.events {
        let _ = writeln!(
            o,
            "<tr><td class=\"num\">{:.1}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
            e.t,
            esc(&e.command),
            esc(&e.outcome),
            e.writes_blocked_ms
                .map(|ms| format!("{ms:.0} ms"))
                .unwrap_or_default()
        );
    }
    o.push_str("</table>\n");
    o
}

/// The timeline as one SVG: rows copied, backlog, lag, and a lane of events and validations,
/// on one time axis.
pub fn timeline_svg(t: &Timeline) -> String {
    let mut svg = String::new();
    if let Err(e) = draw(t, &mut svg) {
        return format!(
            "<p class=\"bad\">The timeline could not be drawn: {}</p>",
            esc(&e)
        );
    }
    svg
}

fn draw(t: &Timeline, svg: &mut String) -> Result<(), String> {
    let end = (t.end() * 1.03).max(1.0);
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = SVGBackend::with_string(svg, (960, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, lane) = root.split_vertically(480);
    let panels = top.split_evenly((3, 1));
    let panel = |area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
                 title: &str,
                 unit: &str,
                 points: Vec<(f64, f64)>,
                 color: RGBColor|
     -> Result<(), String> {
        let ymax = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .margin(6)
            .caption(title, ("sans-serif", 15))
            .x_label_area_size(22)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..end, 0f64..ymax)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .y_desc(unit)
            .x_labels(10)
            .y_labels(4)
            .light_line_style(RGBColor(240, 240, 240))
            .draw()
            .map_err(|e| err(&e))?;
        if points.is_empty() {
            chart
                .draw_series(std::iter::once(Text::new(
                    "nothing recorded",
                    (end * 0.42, ymax * 0.5),
                    ("sans-serif", 13)
                        .into_font()
                        .color(&RGBColor(120, 120, 120)),
                )))
                .map_err(|e| err(&e))?;
        } else {
            chart
                .draw_series(
                    AreaSeries::new(points.iter().copied(), 0.0, color.mix(0.15))
                        .border_style(color.stroke_width(2)),
                )
                .map_err(|e| err(&e))?;
        }
        Ok(())
    };
    let mut copied = t.copied.clone();
    if let Some(first) = copied.first().copied() {
        copied.insert(0, (first.0, 0.0));
    }
    panel(
        &panels[0],
        "rows copied",
        "rows",
        copied,
        RGBColor(9, 105, 218),
    )?;
    panel(
        &panels[1],
        "change-log backlog (follower samples)",
        "changes",
        t.samples.iter().map(|s| (s.0, s.1)).collect(),
        RGBColor(191, 135, 0),
    )?;
    panel(
        &panels[2],
        "follower lag",
        "seconds",
        t.samples.iter().map(|s| (s.0, s.2)).collect(),
        RGBColor(130, 80, 223),
    )?;
    // The lane: each event a tick with its label, the flips with their write-block time, the
    // validations as dots (green passed, red failed).
    let mut chart = ChartBuilder::on(&lane)
        .margin(6)
        .caption("events and validations", ("sans-serif", 15))
        .x_label_area_size(24)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..end, 0f64..4f64)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc(format!("seconds since {} UTC", t.origin))
        .x_labels(10)
        .light_line_style(RGBColor(240, 240, 240))
        .draw()
        .map_err(|e| err(&e))?;
    let mut row = 0usize;
    for e in &t.events {
        let flip = e.writes_blocked_ms.is_some();
        let color = if flip {
            RGBColor(207, 34, 46)
        } else if e.outcome == "refused" || e.outcome == "failed" {
            RGBColor(191, 135, 0)
        } else {
            RGBColor(87, 96, 106)
        };
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(e.t, 0.0), (e.t, 4.0)],
                color.stroke_width(if flip { 2 } else { 1 }),
            )))
            .map_err(|x| err(&x))?;
        // Labels of the flips always; of other events only at start/end of a command, staggered.
        let label = match e.writes_blocked_ms {
            Some(ms) => format!("{} {:.0} ms", e.command, ms),
            None if matches!(e.outcome.as_str(), "started" | "done" | "live" | "copied") => {
                format!("{} {}", e.command, e.outcome)
            }
            None => continue,
        };
        let y = 3.6 - (row % 4) as f64 * 0.55;
        row += 1;
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (e.t + end * 0.004, y),
                ("sans-serif", 12).into_font().color(&color),
            )))
            .map_err(|x| err(&x))?;
    }
    chart
        .draw_series(t.validations.iter().map(|(at, ok)| {
            Circle::new(
                (*at, 0.6),
                6,
                if *ok {
                    RGBColor(26, 127, 55).filled()
                } else {
                    RGBColor(207, 34, 46).filled()
                },
            )
        }))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(std::iter::once(Text::new(
            "validations",
            (0.0, 1.1),
            ("sans-serif", 11).into_font().color(&RGBColor(87, 96, 106)),
        )))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    drop(chart);
    Ok(())
}
