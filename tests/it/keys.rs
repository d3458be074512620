//! Sync keys computed by a cast. A key that is a blue column, alone or widened, is looked up in
//! blue by that column (its index serves); a cast that can change a value (`numeric(10,0)`
//! rounds 2.60 to 3) is not such a key: blue holds no 3.00, so looking it up by the column would
//! find nothing and delete green's row. And a green key blue's type cannot hold (written into
//! green by hand) is a difference validate names, not an error that stops it.

use crate::support::{
    assert_invariant_now, both, connect, copy_ok, empty_db, exec, run, sync_and_check,
};

const CAST_KEYS: &str = "tests/fixtures/cast_keys.yaml";

const BLUE: &str =
    "CREATE TABLE public.amounts (amt numeric(10,2) PRIMARY KEY, label text NOT NULL);
     INSERT INTO public.amounts SELECT g - 0.4, 'a' || g FROM generate_series(1, 50) g;
     CREATE TABLE public.narrow (id integer PRIMARY KEY, v text NOT NULL);
     INSERT INTO public.narrow SELECT g, 'v' || g FROM generate_series(1, 50) g;
     CREATE TABLE public.codes (code character varying(3) PRIMARY KEY, n integer NOT NULL);
     INSERT INTO public.codes SELECT 'c' || g, g FROM generate_series(1, 50) g;
     CREATE TABLE public.prices (price numeric(6,2) PRIMARY KEY, n integer NOT NULL);
     INSERT INTO public.prices SELECT g + 0.01, g FROM generate_series(1, 50) g;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rounded_key_is_looked_up_by_its_value_and_a_widened_one_by_blue_s_column() {
    let url = empty_db("cast_keys").await;
    let mut c = connect(&url).await;
    exec(&mut c, BLUE).await;
    copy_ok(&url, CAST_KEYS).await;
    assert_invariant_now(&url, CAST_KEYS).await;
    for sql in [
        "UPDATE public.amounts SET label = 'changed' WHERE amt = 2.60",
        "INSERT INTO public.amounts VALUES (70.6, 'new')",
        "DELETE FROM public.amounts WHERE amt = 4.60",
        "UPDATE public.amounts SET amt = 300.6 WHERE amt = 9.60",
        "UPDATE public.amounts SET label = label || '!' WHERE amt < 20",
        "UPDATE public.narrow SET v = 'changed' WHERE id = 2",
        "UPDATE public.narrow SET id = 1000 WHERE id = 3",
        "DELETE FROM public.narrow WHERE id = 4",
    ] {
        exec(&mut c, sql).await;
        sync_and_check(&url, CAST_KEYS, sql).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_green_key_blue_s_type_cannot_hold_is_an_extra_row_not_an_error() {
    let url = empty_db("cast_keys_extra").await;
    let mut c = connect(&url).await;
    exec(&mut c, BLUE).await;
    copy_ok(&url, CAST_KEYS).await;
    assert_invariant_now(&url, CAST_KEYS).await;
    // 2^40 fits green's bigint, not blue's integer: the lag-aware re-check must not cast it.
    // 'c10x' as blue's character varying(3) is 'c10', and 1.005 as numeric(6,2) is 1.01: both
    // blue rows exist, and neither may be taken for the row green holds by hand.
    exec(
        &mut c,
        "INSERT INTO cast_keys.widened VALUES (1099511627776, 'by hand'), (7000, 'by hand too');
         INSERT INTO cast_keys.coded VALUES ('c10x', 10);
         INSERT INTO cast_keys.priced VALUES (1.005, 1), (12345.01, 1);",
    )
    .await;
    let out = run(&url, &["validate", "-m", CAST_KEYS, "--format", "json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    for (table, extra) in [("widened", 2), ("coded", 1), ("priced", 2), ("rounded", 0)] {
        let t = v["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == table)
            .unwrap_or_else(|| panic!("{table} in {v}"));
        assert_eq!(
            (
                t["extra"].as_u64(),
                t["missing"].as_u64(),
                t["changed"].as_u64()
            ),
            (Some(extra), Some(0), Some(0)),
            "{table}: {v:#}"
        );
    }
}
