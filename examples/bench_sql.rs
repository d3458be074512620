//! Prints, per green table, the baselines `scripts/bench` times `validate` against: the exact
//! comparison `(M(blue) EXCEPT ALL green) + (green EXCEPT ALL M(blue))` in one session, and a
//! server-side md5 sum of both sides. Usage: `bench_sql MAPPING DATABASE_URL`.

use bluegreen::plan::query::{Shape, invariant_diff, mapped_columns, mapping_select_typed};
use bluegreen::sql::{Ident, QName, join};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let m =
        bluegreen::mapping::load(std::path::Path::new(&args[1])).unwrap_or_else(|e| panic!("{e}"));
    let mut c = bluegreen::pg::connect(&args[2])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cat = bluegreen::control::load_catalog(&mut c, &m)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for e in &m.tables {
        let gt = cat
            .table(&QName::new(&m.green, &e.name))
            .expect("green table");
        println!("except\t{}", invariant_diff(e, gt, &m.control_schema));
        let cols = join(mapped_columns(e, gt).iter().map(|c| Ident::new(*c)), ", ");
        let md5 = |rel: String| {
            format!(
                "SELECT ROW(count(*), sum(('x' || substr(md5(ROW({cols})::text), 1, 15))::bit(60)::int8)) FROM ({rel}) AS r"
            )
        };
        println!(
            "md5\tSELECT ({}) = ({})",
            md5(mapping_select_typed(e, gt, &m.control_schema, &Shape::default()).into_string()),
            md5(format!("SELECT {cols} FROM {}", gt.qname()))
        );
    }
}
