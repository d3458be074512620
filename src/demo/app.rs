//! The demo's application: tokio tasks on connections of their own writing CarBot the way its
//! application does (leads, customers, workshops, chat messages), in whichever schema their
//! session's `search_path` names. Some tasks keep one connection for the whole demo (they stay on
//! blue through every flip: old sessions); the others connect for every transaction (they follow
//! `search_path`: after a cutover they write green with the new schema's columns).
//!
//! Each task writes only rows of its own (leads and customers it created, a share of the
//! workshops), so what it committed last is what each row must hold: the [`Ledger`]. Writes lost
//! are then counted from the rows of both schemas ([`Ledger::lost`]), never assumed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgDatabaseError};
use sqlx::{Connection, PgConnection, Row};

/// The `application_name` of the simulated application's sessions (bluegreen's own sessions are
/// `bluegreen`, which `cutover` and `finalize` do not count as application writers).
pub const APPLICATION_NAME: &str = "carbot-app";

/// What one task committed last for each of its rows.
#[derive(Default, Debug)]
pub struct Ledger {
    /// Lead id -> (lead_score, status), or None once deleted.
    pub leads: BTreeMap<String, Option<(i32, String)>>,
    /// Customer id -> (first name, last name), or None once deleted.
    pub customers: BTreeMap<String, Option<(String, String)>>,
    /// Workshop id -> phone.
    pub workshops: BTreeMap<String, String>,
    /// Chat message ids inserted.
    pub messages: BTreeSet<i64>,
}

fn ids<V>(m: &BTreeMap<String, V>) -> Vec<String> {
    m.keys().cloned().collect()
}

impl Ledger {
    fn merge(&mut self, o: Ledger) {
        self.leads.extend(o.leads);
        self.customers.extend(o.customers);
        self.workshops.extend(o.workshops);
        self.messages.extend(o.messages);
    }

    pub fn keys(&self) -> usize {
        self.leads.len() + self.customers.len() + self.workshops.len() + self.messages.len()
    }

    /// Rows whose value in `schema` is not what the application committed last: (table, key,
    /// expected, found), for blue (`public`, legacy columns) or green (`carbot_v2`).
    pub async fn lost(
        &self,
        conn: &mut PgConnection,
        green: bool,
    ) -> Result<Vec<String>, sqlx::Error> {
        let mut out = Vec::new();
        // Leads: green has status and score; blue has the legacy status text and a soft delete.
        let q = if green {
            "SELECT id::text, lead_score, status::text FROM carbot_v2.leads WHERE id = ANY($1::uuid[])"
        } else {
            "SELECT id::text, lead_score, status FROM public.leads WHERE id = ANY($1::uuid[]) AND deleted_at IS NULL"
        };
        let found: BTreeMap<String, (i32, String)> = sqlx::query(q)
            .bind(ids(&self.leads))
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        compare(&mut out, "leads", &self.leads, &found);
        let q = if green {
            "SELECT id::text, first_name, coalesce(last_name, '') FROM carbot_v2.customers WHERE id = ANY($1::uuid[])"
        } else {
            "SELECT id::text, split_part(name, ' ', 1), substr(name, length(split_part(name, ' ', 1)) + 2) FROM public.customers WHERE id = ANY($1::uuid[])"
        };
        let found: BTreeMap<String, (String, String)> = sqlx::query(q)
            .bind(ids(&self.customers))
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        compare(&mut out, "customers", &self.customers, &found);
        let schema = if green { "carbot_v2" } else { "public" };
        let found: BTreeMap<String, String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id::text, coalesce(phone, '') FROM {schema}.workshops WHERE id = ANY($1::uuid[])"
        )))
        .bind(ids(&self.workshops))
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        for (id, phone) in &self.workshops {
            if found.get(id) != Some(phone) {
                out.push(format!(
                    "{schema}.workshops {id}: phone {phone:?} committed, {:?} found",
                    found.get(id)
                ));
            }
        }
        let ids: Vec<i64> = self.messages.iter().copied().collect();
        let found: BTreeSet<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM {schema}.chat_messages WHERE id = ANY($1)"
        )))
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
        for id in ids.iter().filter(|i| !found.contains(i)) {
            out.push(format!("{schema}.chat_messages {id}: committed, not found"));
        }
        Ok(out)
    }
}

fn compare<V: PartialEq + std::fmt::Debug>(
    out: &mut Vec<String>,
    table: &str,
    expected: &BTreeMap<String, Option<V>>,
    found: &BTreeMap<String, V>,
) {
    for (id, want) in expected {
        let got = found.get(id);
        if want.as_ref() != got {
            out.push(format!("{table} {id}: {want:?} committed, {got:?} found"));
        }
    }
}

/// Counters the narration reads while the tasks run.
#[derive(Default)]
pub struct Counters {
    pub commits: AtomicU64,
    pub on_green: AtomicU64,
    /// Transactions that gave way to sync with 40001 and were retried (what an application does
    /// with a serialization failure).
    pub retried: AtomicU64,
    /// Statements that failed for any other reason, or kept failing.
    pub errors: AtomicU64,
    pub first_error: std::sync::Mutex<Option<String>>,
}

pub struct App {
    pub stop: Arc<AtomicBool>,
    pub counters: Arc<Counters>,
    tasks: Vec<tokio::task::JoinHandle<Ledger>>,
}

/// Start `tasks` application tasks against `url` (every other one long-lived), each pausing
/// `pause` between transactions.
pub async fn start(url: &str, tasks: usize, pause: Duration) -> Result<App, sqlx::Error> {
    let opts: PgConnectOptions = url
        .parse::<PgConnectOptions>()?
        .application_name(APPLICATION_NAME);
    let mut c = PgConnection::connect_with(&opts).await?;
    let workshops: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM public.workshops ORDER BY id")
            .fetch_all(&mut c)
            .await?;
    c.close().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let handles = (0..tasks)
        .map(|t| {
            let mine: Vec<String> = workshops
                .iter()
                .enumerate()
                .filter(|(i, _)| i % tasks == t)
                .map(|(_, w)| w.clone())
                .collect();
            let task = Task {
                id: t,
                long_lived: t % 2 == 0,
                opts: opts.clone(),
                workshops: mine,
                stop: stop.clone(),
                counters: counters.clone(),
                pause,
            };
            tokio::spawn(task.run())
        })
        .collect();
    Ok(App {
        stop,
        counters,
        tasks: handles,
    })
}

impl App {
    /// Stop every task after its transaction in flight; their ledgers, merged.
    pub async fn stop(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Ledger::default();
        for t in self.tasks {
            if let Ok(l) = t.await {
                all.merge(l);
            }
        }
        all
    }
}

struct Task {
    id: usize,
    long_lived: bool,
    opts: PgConnectOptions,
    workshops: Vec<String>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    pause: Duration,
}

/// One write, rendered for the schema the session is on.
struct Write {
    sql: String,
    args: Vec<Option<String>>,
    then: Effect,
}

enum Effect {
    Lead(String, Option<(i32, String)>),
    Customer(String, Option<(String, String)>),
    Workshop(String, String),
    Message,
}

/// A uuid-shaped id from a name (deterministic per task and sequence number).
fn id(kind: &str, task: usize, seq: u64) -> String {
    let h = blake3::hash(format!("demo:{kind}:{task}:{seq}").as_bytes()).to_hex();
    let h = h.as_str();
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

const STATUSES: [&str; 3] = ["new", "contacted", "qualified"];

impl Task {
    async fn run(self) -> Ledger {
        let mut ledger = Ledger::default();
        let mut live_leads: Vec<String> = Vec::new();
        let mut live_customers: Vec<String> = Vec::new();
        let mut held: Option<(PgConnection, bool)> = None;
        let mut seq: u64 = 0;
        // A small LCG: which existing row a write picks, the same on every run.
        let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ (self.id as u64);
        while !self.stop.load(Ordering::Relaxed) {
            seq += 1;
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let pick = (rng >> 33) as usize;
            let (mut conn, green) = match held.take() {
                Some(h) => h,
                None => match self.connect().await {
                    Ok(c) => c,
                    Err(e) => {
                        self.error(format!("connect: {e}"));
                        tokio::time::sleep(self.pause).await;
                        continue;
                    }
                },
            };
            let w = self.write(seq, pick, green, &mut live_leads, &mut live_customers);
            match self.commit(&mut conn, &w).await {
                Ok(message) => {
                    self.counters.commits.fetch_add(1, Ordering::Relaxed);
                    if green {
                        self.counters.on_green.fetch_add(1, Ordering::Relaxed);
                    }
                    match w.then {
                        Effect::Lead(id, v) => {
                            match &v {
                                Some(_) if !live_leads.contains(&id) => live_leads.push(id.clone()),
                                None => live_leads.retain(|l| *l != id),
                                _ => {}
                            }
                            ledger.leads.insert(id, v);
                        }
                        Effect::Customer(id, v) => {
                            match &v {
                                Some(_) if !live_customers.contains(&id) => {
                                    live_customers.push(id.clone())
                                }
                                None => live_customers.retain(|l| *l != id),
                                _ => {}
                            }
                            ledger.customers.insert(id, v);
                        }
                        Effect::Workshop(id, phone) => {
                            ledger.workshops.insert(id, phone);
                        }
                        Effect::Message => {
                            if let Some(id) = message {
                                ledger.messages.insert(id);
                            }
                        }
                    }
                }
                Err(e) => self.error(e),
            }
            if self.long_lived {
                held = Some((conn, green));
            } else {
                let _ = conn.close().await;
            }
            tokio::time::sleep(self.pause).await;
        }
        ledger
    }

    fn error(&self, e: String) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.counters.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(e);
        }
    }

    /// A new session, and whether its `search_path` puts it on green.
    async fn connect(&self) -> Result<(PgConnection, bool), sqlx::Error> {
        let mut c = PgConnection::connect_with(&self.opts).await?;
        let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()::text")
            .fetch_one(&mut c)
            .await?;
        Ok((c, schema.as_deref() == Some("carbot_v2")))
    }

    /// Run one write in a transaction of its own; a 40001 (sync giving way) is retried like an
    /// application retries a serialization failure. The id a chat message insert returned.
    async fn commit(&self, conn: &mut PgConnection, w: &Write) -> Result<Option<i64>, String> {
        for attempt in 1..=5 {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(w.sql.clone()));
            for a in &w.args {
                q = q.bind(a.clone());
            }
            let result = async {
                let mut tx = conn.begin().await?;
                let row = q.fetch_optional(&mut *tx).await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(row.and_then(|r| r.try_get::<i64, _>(0).ok()))
            }
            .await;
            match result {
                Ok(id) => return Ok(id),
                Err(e) => {
                    let code = e
                        .as_database_error()
                        .and_then(|d| d.try_downcast_ref::<PgDatabaseError>())
                        .map(|p| p.code().to_string());
                    if code.as_deref() == Some("40001") && attempt < 5 {
                        self.counters.retried.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
                        continue;
                    }
                    return Err(format!("{e}\n  in: {}", w.sql));
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// The next write of this task: the mix of the CarBot application, in blue's legacy columns
    /// or green's new ones.
    fn write(
        &self,
        seq: u64,
        pick: usize,
        green: bool,
        leads: &mut [String],
        customers: &mut [String],
    ) -> Write {
        let t = self.id;
        let workshop = self.workshops[pick % self.workshops.len()].clone();
        let lead = (!leads.is_empty()).then(|| leads[pick % leads.len()].clone());
        let customer = (!customers.is_empty()).then(|| customers[pick % customers.len()].clone());
        let score = (seq % 101) as i32;
        let status = STATUSES[pick % STATUSES.len()].to_string();
        let s = |v: &str| Some(v.to_string());
        match (seq % 10, lead, customer) {
            (3 | 4, Some(l), _) => Write {
                sql: if green {
                    "UPDATE leads SET lead_score = $2::int, status = $3::lead_status, updated_at = now() WHERE id = $1::uuid".into()
                } else {
                    "UPDATE leads SET lead_score = $2::int, status = $3, updated_at = now() WHERE id = $1::uuid".into()
                },
                args: vec![s(&l), s(&score.to_string()), s(&status)],
                then: Effect::Lead(l, Some((score, status))),
            },
            (5, Some(l), _) if leads.len() > 3 => Write {
                sql: if green {
                    "DELETE FROM leads WHERE id = $1::uuid".into()
                } else {
                    // Legacy soft delete: green drops the row (its filter is deleted_at IS NULL).
                    "UPDATE leads SET deleted_at = now() WHERE id = $1::uuid".into()
                },
                args: vec![s(&l)],
                then: Effect::Lead(l, None),
            },
            (6, _, _) | (7, _, None) => {
                let c = id("customer", t, seq);
                let (first, last) = (format!("Demo{t}"), format!("Kunde{seq}"));
                Write {
                    sql: if green {
                        "INSERT INTO customers (id, workshop_id, first_name, last_name, email, is_active) VALUES ($1::uuid, $2::uuid, $3, $4, $5, true)".into()
                    } else {
                        "INSERT INTO customers (id, workshop_id, name, email, active) VALUES ($1::uuid, $2::uuid, $3 || ' ' || $4, $5, true)".into()
                    },
                    args: vec![s(&c), s(&workshop), s(&first), s(&last), s(&format!("demo{t}.{seq}@example.org"))],
                    then: Effect::Customer(c, Some((first, last))),
                }
            }
            (7, _, Some(c)) if seq % 20 == 7 && customers.len() > 3 => Write {
                sql: "DELETE FROM customers WHERE id = $1::uuid".into(),
                args: vec![s(&c)],
                then: Effect::Customer(c, None),
            },
            (7, _, Some(c)) => {
                let (first, last) = (format!("Demo{t}"), format!("Renamed{seq}"));
                Write {
                    sql: if green {
                        "UPDATE customers SET first_name = $2, last_name = $3, updated_at = now() WHERE id = $1::uuid".into()
                    } else {
                        "UPDATE customers SET name = $2 || ' ' || $3, updated_at = now() WHERE id = $1::uuid".into()
                    },
                    args: vec![s(&c), s(&first), s(&last)],
                    then: Effect::Customer(c, Some((first, last))),
                }
            }
            (8, _, _) => {
                let phone = format!("+49 30 {t}{seq:07}");
                Write {
                    sql: "UPDATE workshops SET phone = $2, updated_at = now() WHERE id = $1::uuid".into(),
                    args: vec![s(&workshop), s(&phone)],
                    then: Effect::Workshop(workshop, phone),
                }
            }
            // Chat messages are written through blue (green's chat tables are aggregates with no
            // reverse: a rollback would lose what new sessions wrote there).
            (9, _, _) if !green => Write {
                sql: "INSERT INTO chat_messages (workshop_id, session_id, sender, message) VALUES ($1::uuid, $2, 'user', $3) RETURNING id".into(),
                args: vec![s(&workshop), s(&format!("demo-{t}-{}", seq / 50)), s(&format!("Hallo, Termin für Inspektion? ({seq})"))],
                then: Effect::Message,
            },
            _ => {
                let l = id("lead", t, seq);
                Write {
                    sql: if green {
                        "INSERT INTO leads (id, workshop_id, client_key, name, email, phone, subject, description, status, priority, lead_score) VALUES ($1::uuid, $2::uuid, $3, $4, $5, $6, $7, $7, $8::lead_status, 'medium', $9::int)".into()
                    } else {
                        "INSERT INTO leads (id, workshop_id, kunde_id, name, email, telefon, anliegen, status, priority, lead_score) VALUES ($1::uuid, $2::uuid, $3, $4, $5, $6, $7, $8, 'medium', $9::int)".into()
                    },
                    args: vec![
                        s(&l),
                        s(&workshop),
                        s(&format!("web-{t}-{seq}")),
                        s(&format!("Demo Lead {t}/{seq}")),
                        s(&format!("lead{t}.{seq}@example.org")),
                        s(&format!("+49 151 {t}{seq:06}")),
                        s("Inspektion und Ölwechsel"),
                        s(&status),
                        s(&score.to_string()),
                    ],
                    then: Effect::Lead(l, Some((score, status))),
                }
            }
        }
    }
}
