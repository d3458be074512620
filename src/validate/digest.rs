//! Order-free digests of rendered rows: blake3 per row on rayon (never on the async runtime), a
//! set's digest is its count and the wrapping sum of its row hashes.

use futures::TryStreamExt;
use rayon::prelude::*;
use sqlx::PgConnection;

use crate::sql::Sql;

/// Rows hashed per rayon batch while streaming (bounds memory per worker).
const HASH_BATCH: usize = 8_192;

/// count + order-free digest of a set of rendered rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    pub rows: u64,
    pub sum: u128,
}

impl Digest {
    pub fn add(&mut self, other: Digest) {
        self.rows += other.rows;
        self.sum = self.sum.wrapping_add(other.sum);
    }
    pub fn hex(&self) -> String {
        format!("{:032x}", self.sum)
    }
}

/// Hash rendered rows on the rayon pool.
pub fn digest_rows(rows: &[String]) -> Digest {
    let sum = rows
        .par_iter()
        .map(|r| {
            let h = blake3::hash(r.as_bytes());
            u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes"))
        })
        .reduce(|| 0u128, u128::wrapping_add);
    Digest {
        rows: rows.len() as u64,
        sum,
    }
}

/// The digest of the one-text-column rows `sql` returns, streamed in batches.
pub(super) async fn stream_digest(
    conn: &mut PgConnection,
    sql: &Sql,
) -> Result<Digest, sqlx::Error> {
    let mut total = Digest::default();
    let mut batch: Vec<String> = Vec::with_capacity(HASH_BATCH);
    {
        let mut rows = sqlx::query_scalar::<_, String>(sql.assert_safe()).fetch(&mut *conn);
        while let Some(r) = rows.try_next().await? {
            batch.push(r);
            if batch.len() == HASH_BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(HASH_BATCH));
                // CPU work off the async runtime, on rayon.
                let d = tokio::task::spawn_blocking(move || digest_rows(&full))
                    .await
                    .expect("hash task");
                total.add(d);
            }
        }
    }
    if !batch.is_empty() {
        let d = tokio::task::spawn_blocking(move || digest_rows(&batch))
            .await
            .expect("hash task");
        total.add(d);
    }
    Ok(total)
}
