//! Our tables and plan nodes as bytes, for an engine that plans in one process and runs
//! in others (Ballista; the cluster crate puts these behind its codecs). Each form is
//! self-contained: the `events` table travels as the committed files of the snapshot it
//! reads (the live buffer is the client's memory: a distributed query sees events once
//! they are flushed), a funnel table or node as its [`FunnelQuery`], so the receiving
//! process needs no funnelhouse state, only the same files: with `[storage] url` every
//! file by its object key (this node's once uploaded), else at the same local paths.
//!
//! A funnel table decoded here plans its fold behind a repartition by user_id: the
//! in-process broadcast exchange needs all fold partitions in one process, while a
//! distributed engine cuts the repartition into a shuffle between stages.
//!
//! Layout: `FHW1`, a kind byte, the JSON header's length (u32 LE), the header, then the
//! kind's payload (a funnel table's `events` table; nothing for the others). No
//! protobuf message starts with `F` (field 8 with the invalid wire type 6), so the
//! codecs tell ours from the engine's own by the first bytes.

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::catalog::TableProvider;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::physical_plan::ExecutionPlan;
use funnelhouse_storage::{FileMeta, Snapshot};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::funnel::FoldExchange;
use crate::funnel::plan::{FunnelFoldExec, FunnelMergeExec, FunnelQuery};
use crate::funnel::sql::{FunnelColumns, FunnelTable};
use crate::table::{EventsTable, StaticSource};

const MAGIC: &[u8; 4] = b"FHW1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Events = b'e' as isize,
    FunnelTable = b't' as isize,
    Fold = b'f' as isize,
    Merge = b'm' as isize,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        [Kind::Events, Kind::FunnelTable, Kind::Fold, Kind::Merge]
            .into_iter()
            .find(|k| *k as u8 == b)
    }
}

#[derive(Serialize, Deserialize)]
struct EventsHeader {
    data_dir: PathBuf,
    shared_url: Option<String>,
    files: Vec<FileMeta>,
}

#[derive(Serialize, Deserialize)]
struct FunnelTableHeader {
    query: FunnelQuery,
    columns: FunnelColumns,
}

/// The bytes of `table` when it is one of ours (`events`, `funnel(...)`), else None.
pub fn encode_table(table: &dyn TableProvider) -> Option<Result<Vec<u8>>> {
    if let Some(events) = table.downcast_ref::<EventsTable>() {
        return Some(encode_events(events));
    }
    let funnel = table.downcast_ref::<FunnelTable>()?;
    Some((|| {
        let Some(events) = funnel.events.downcast_ref::<EventsTable>() else {
            return Err(DataFusionError::NotImplemented(
                "a funnel over a table other than `events` cannot be distributed".into(),
            ));
        };
        let header = FunnelTableHeader {
            query: (*funnel.query).clone(),
            columns: funnel.columns,
        };
        frame(Kind::FunnelTable, &header, &encode_events(events)?)
    })())
}

/// The table `buf` holds when it is one of ours, else None (the engine's own bytes).
pub fn decode_table(buf: &[u8]) -> Option<Result<Arc<dyn TableProvider>>> {
    let (kind, header, payload) = unframe(buf)?;
    Some((|| -> Result<Arc<dyn TableProvider>> {
        match kind {
            Kind::Events => Ok(Arc::new(decode_events(header)?)),
            Kind::FunnelTable => {
                let FunnelTableHeader { query, columns } = json(header)?;
                let events = match unframe(payload) {
                    Some((Kind::Events, h, _)) => decode_events(h)?,
                    _ => return Err(corrupt("a funnel table without its events table")),
                };
                Ok(Arc::new(FunnelTable {
                    events: Arc::new(events),
                    query: Arc::new(query),
                    columns,
                    exchange: FoldExchange::Repartition,
                }))
            }
            Kind::Fold | Kind::Merge => Err(corrupt("a plan node where a table was expected")),
        }
    })())
}

/// The bytes of `plan` when it is one of our nodes, else None.
pub fn encode_plan(plan: &dyn ExecutionPlan) -> Option<Result<Vec<u8>>> {
    if let Some(fold) = plan.downcast_ref::<FunnelFoldExec>() {
        let (query, broadcast) = fold.query();
        if broadcast {
            return Some(Err(DataFusionError::NotImplemented(
                "a broadcast funnel fold runs in one process only; plan it with \
                 FoldExchange::Repartition to distribute it"
                    .into(),
            )));
        }
        return Some(frame(Kind::Fold, query.as_ref(), &[]));
    }
    let merge = plan.downcast_ref::<FunnelMergeExec>()?;
    Some(frame(Kind::Merge, merge.query().as_ref(), &[]))
}

/// Our plan node `buf` holds over `inputs`, else None (the engine's own bytes).
pub fn decode_plan(
    buf: &[u8],
    inputs: &[Arc<dyn ExecutionPlan>],
) -> Option<Result<Arc<dyn ExecutionPlan>>> {
    let (kind, header, _) = unframe(buf)?;
    Some((|| -> Result<Arc<dyn ExecutionPlan>> {
        let [input] = inputs else {
            return Err(corrupt("a funnel node needs exactly one input"));
        };
        let query = Arc::new(json::<FunnelQuery>(header)?);
        let input = Arc::clone(input);
        match kind {
            Kind::Fold => Ok(Arc::new(FunnelFoldExec::by_user(input, query)?)),
            Kind::Merge => Ok(Arc::new(FunnelMergeExec::new(input, query))),
            Kind::Events | Kind::FunnelTable => {
                Err(corrupt("a table where a plan node was expected"))
            }
        }
    })())
}

fn encode_events(events: &EventsTable) -> Result<Vec<u8>> {
    let snapshot = events.source.snapshot();
    let header = EventsHeader {
        data_dir: events.data_dir.clone(),
        shared_url: events.shared_url.as_ref().map(|u| u.as_str().to_string()),
        files: (events.source.files_elsewhere(&snapshot.files))
            .map_err(|e| DataFusionError::External(e.into()))?,
    };
    frame(Kind::Events, &header, &[])
}

fn decode_events(header: &[u8]) -> Result<EventsTable> {
    let header: EventsHeader = json(header)?;
    let snapshot = Snapshot {
        files: Arc::new(header.files),
        ..Default::default()
    };
    let shared_url = header
        .shared_url
        .as_deref()
        .map(ObjectStoreUrl::parse)
        .transpose()?;
    Ok(EventsTable::new(
        Arc::new(StaticSource(snapshot)),
        &header.data_dir,
        shared_url,
    ))
}

fn frame(kind: Kind, header: &impl Serialize, payload: &[u8]) -> Result<Vec<u8>> {
    let header = serde_json::to_vec(header).map_err(|e| DataFusionError::External(e.into()))?;
    let len = u32::try_from(header.len()).map_err(|_| corrupt("a header past 4 GiB"))?;
    let mut buf = Vec::with_capacity(9 + header.len() + payload.len());
    buf.extend_from_slice(MAGIC);
    buf.push(kind as u8);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&header);
    buf.extend_from_slice(payload);
    Ok(buf)
}

/// (kind, header, payload) of our bytes; None for bytes that are not ours.
fn unframe(buf: &[u8]) -> Option<(Kind, &[u8], &[u8])> {
    let rest = buf.strip_prefix(MAGIC)?;
    let (&kind, rest) = rest.split_first()?;
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let rest = &rest[4..];
    Some((Kind::from_byte(kind)?, rest.get(..len)?, rest.get(len..)?))
}

fn json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(&format!("a bad header: {e}")))
}

fn corrupt(what: &str) -> DataFusionError {
    DataFusionError::Internal(format!("funnelhouse plan bytes: {what}"))
}
