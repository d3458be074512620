//! The COPY engine: binary `COPY (SELECT M) TO STDOUT` on one connection piped into `COPY green.T
//! FROM STDIN` on another, through this process, batched, with backpressure and abort.

use futures::StreamExt;
use sqlx::PgConnection;

use crate::catalog;
use crate::mapping::{Mapping, TableEntry};
use crate::plan::query::{Shape, mapped_columns, mapping_select_typed};
use crate::sql::{Ident, join};

/// The COPY engine: binary `COPY (SELECT M) TO STDOUT` on `src` piped into `COPY green.T FROM
/// STDIN` inside the chunk's transaction, batched into 256 KiB sends; the next buffer is read only
/// after the previous one was written (backpressure), and any error aborts the COPY IN.
pub(super) async fn copy_chunk(
    src: &mut PgConnection,
    tx: &mut PgConnection,
    m: &Mapping,
    e: &TableEntry,
    gt: &catalog::Table,
    shape: &Shape<'_>,
) -> Result<u64, sqlx::Error> {
    // Binary COPY needs the exact green types on both sides.
    let select = mapping_select_typed(e, gt, &m.control_schema, shape);
    let target = format!(
        "COPY {} ({}) FROM STDIN (FORMAT binary)",
        gt.qname(),
        join(mapped_columns(e, gt).iter().map(|c| Ident::new(*c)), ", ")
    );
    let mut sink = tx.copy_in_raw(&target).await?;
    let mut stream = src
        .copy_out_raw(&format!("COPY ({select}) TO STDOUT (FORMAT binary)"))
        .await?;
    let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut failed = None;
    while let Some(part) = stream.next().await {
        match part {
            Ok(bytes) => {
                buf.extend_from_slice(&bytes);
                if buf.len() >= 256 * 1024 {
                    if let Err(e) = sink.send(std::mem::take(&mut buf)).await {
                        failed = Some(e);
                        break;
                    }
                    buf.reserve(256 * 1024);
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(stream);
    if failed.is_none()
        && !buf.is_empty()
        && let Err(e) = sink.send(buf).await
    {
        failed = Some(e);
    }
    match failed {
        Some(e) => {
            let _ = sink.abort(e.to_string()).await;
            Err(e)
        }
        None => sink.finish().await,
    }
}
