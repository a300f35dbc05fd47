//! `[query] timeout` and `max_result_rows` inside the plan, for the Postgres wire.
//!
//! `POST /v1/sql` and the funnel run whole within [`QueryEngine::run`]'s timeout and cut
//! results at `max_result_rows`. The Postgres wire instead hands a row stream to the
//! connection: datafusion-postgres times only planning, and pgwire gathers all rows of an
//! extended-protocol result (psycopg, JDBC) in memory before sending them. [`LimitsExec`]
//! sits at the root of every plan of that session: past `max_result_rows` rows, or at the
//! deadline, it drops its input (stopping the query's work and returning its memory to
//! the pool) whether or not anyone is reading, and the client gets an error naming the
//! limit in place of further rows.
//!
//! The deadline runs from the start of execution and includes the time the client takes
//! to read (as ClickHouse's `max_execution_time` does), so a client that stops reading
//! cannot hold a query's memory; Postgres's `statement_timeout` would not count that time.
//!
//! [`QueryEngine::run`]: crate::QueryEngine::run

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use datafusion::prelude::SessionContext;
use futures::StreamExt;

/// The limits a [`LimitsExec`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct ResultLimits {
    /// From the start of execution.
    pub timeout: Duration,
    pub max_rows: usize,
}

/// A session sharing `ctx`'s tables, functions, memory pool and planner (on a cluster,
/// Ballista's) whose every plan stops at `limits`.
pub fn with_limits(ctx: &SessionContext, limits: ResultLimits) -> SessionContext {
    let state = ctx.state();
    let planner = LimitsPlanner {
        inner: Arc::clone(state.query_planner()),
        limits,
    };
    let state = SessionStateBuilder::new_from_existing(state)
        .with_query_planner(Arc::new(planner))
        .build();
    SessionContext::new_with_state(state)
}

/// The session's planner, with a [`LimitsExec`] on top of what it plans.
#[derive(Debug)]
struct LimitsPlanner {
    inner: Arc<dyn QueryPlanner + Send + Sync>,
    limits: ResultLimits,
}

#[async_trait]
impl QueryPlanner for LimitsPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut plan = self
            .inner
            .create_physical_plan(logical_plan, session)
            .await?;
        // One output partition, so the row limit counts the whole result.
        if plan.properties().output_partitioning().partition_count() > 1 {
            plan = Arc::new(CoalescePartitionsExec::new(plan));
        }
        Ok(Arc::new(LimitsExec::new(plan, self.limits)))
    }
}

/// Passes its input through until `max_rows` rows or `timeout` after `execute`, then
/// drops the input and ends with an error naming the limit.
#[derive(Debug)]
pub struct LimitsExec {
    input: Arc<dyn ExecutionPlan>,
    limits: ResultLimits,
}

impl LimitsExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, limits: ResultLimits) -> Self {
        Self { input, limits }
    }
}

/// The error a stream ends with at its deadline, worded as Postgres words it (though a
/// Postgres client sees SQLSTATE XX000, as for any error inside a result stream, not
/// 57014).
fn timeout_error(timeout: Duration) -> DataFusionError {
    DataFusionError::Execution(format!(
        "canceling statement due to statement timeout: it ran longer than query.timeout ({timeout:?})"
    ))
}

fn too_many_rows(max_rows: usize) -> DataFusionError {
    DataFusionError::Execution(format!(
        "the result has more than query.max_result_rows ({max_rows}) rows: add a LIMIT, aggregate, or raise the limit"
    ))
}

impl DisplayAs for LimitsExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "LimitsExec: timeout={:?}, max_rows={}",
            self.limits.timeout, self.limits.max_rows
        )
    }
}

impl ExecutionPlan for LimitsExec {
    fn name(&self) -> &str {
        "LimitsExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match <[_; 1]>::try_from(children) {
            Ok([input]) => Ok(Arc::new(Self::new(input, self.limits))),
            Err(_) => Err(DataFusionError::Internal(
                "LimitsExec takes one input".into(),
            )),
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        Ok(limited_stream(
            self.input.execute(partition, context)?,
            self.limits,
        ))
    }
}

/// `input` until `limits.max_rows` rows or `limits.timeout` from now; then `input` is
/// dropped and the stream ends with an error naming the limit.
fn limited_stream(
    mut input: SendableRecordBatchStream,
    limits: ResultLimits,
) -> SendableRecordBatchStream {
    // A small channel: a client that stops reading holds two batches, not the query.
    let mut builder = RecordBatchReceiverStreamBuilder::new(input.schema(), 2);
    let tx = builder.tx();
    let deadline = tokio::time::Instant::now() + limits.timeout;
    builder.spawn(async move {
        let deadline = tokio::time::sleep_until(deadline);
        tokio::pin!(deadline);
        let mut rows = 0;
        let error = loop {
            let next = tokio::select! {
                _ = &mut deadline => break timeout_error(limits.timeout),
                next = input.next() => next,
            };
            let Some(item) = next else { return Ok(()) };
            if let Ok(batch) = &item {
                rows += batch.num_rows();
                if rows > limits.max_rows {
                    break too_many_rows(limits.max_rows);
                }
            }
            tokio::select! {
                _ = &mut deadline => break timeout_error(limits.timeout),
                // The reader is gone: so is the query.
                sent = tx.send(item) => if sent.is_err() { return Ok(()) },
            }
        };
        drop(input);
        let _ = tx.send(Err(error)).await;
        Ok(())
    });
    builder.build()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;

    use super::*;

    /// An endless stream of one-row batches that says when it is dropped.
    struct Endless {
        schema: SchemaRef,
        dropped: Arc<AtomicBool>,
    }

    impl Drop for Endless {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn endless(dropped: &Arc<AtomicBool>) -> SendableRecordBatchStream {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let state = Endless {
            schema: Arc::clone(&schema),
            dropped: Arc::clone(dropped),
        };
        let stream = futures::stream::unfold(state, |state| async move {
            let batch = RecordBatch::try_new(
                Arc::clone(&state.schema),
                vec![Arc::new(Int64Array::from(vec![1]))],
            )
            .map_err(DataFusionError::from);
            Some((batch, state))
        });
        Box::pin(RecordBatchStreamAdapter::new(schema, stream))
    }

    /// The planner puts the deadline on top of every plan, and it stops a query.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_plan_of_the_session_stops_at_the_deadline() {
        let ctx = with_limits(
            &SessionContext::new(),
            ResultLimits {
                timeout: Duration::from_millis(200),
                max_rows: usize::MAX,
            },
        );
        let df = ctx
            .sql("SELECT count(*) FROM generate_series(1, 1000000000000)")
            .await
            .unwrap();
        let plan = df.clone().create_physical_plan().await.unwrap();
        assert_eq!(plan.name(), "LimitsExec");
        let err = tokio::time::timeout(Duration::from_secs(10), df.collect())
            .await
            .expect("the query outlived its deadline")
            .unwrap_err();
        assert!(err.to_string().contains("query.timeout"), "{err}");
    }

    /// A reader that stops reading still sees the query stopped at the deadline: the
    /// input is dropped without being polled, and the next read is the timeout error.
    #[tokio::test]
    async fn the_input_is_dropped_at_the_deadline_even_when_nobody_reads() {
        let timeout = Duration::from_millis(200);
        let dropped = Arc::new(AtomicBool::new(false));
        let limits = ResultLimits {
            timeout,
            max_rows: usize::MAX,
        };
        let mut out = limited_stream(endless(&dropped), limits);
        assert!(
            out.next().await.unwrap().is_ok(),
            "rows flow before the deadline"
        );

        tokio::time::sleep(timeout * 3).await;
        assert!(
            dropped.load(Ordering::SeqCst),
            "input still held after the deadline"
        );
        let mut rows_after = 0;
        let err = loop {
            match out.next().await {
                Some(Ok(_)) => rows_after += 1,
                Some(Err(e)) => break e,
                None => panic!("the stream ended without the timeout error"),
            }
            assert!(rows_after <= 3, "batches still flow past the deadline");
        };
        assert!(err.to_string().contains("query.timeout"), "{err}");
    }

    /// Past max_rows the stream ends with an error naming the limit (the rows before it
    /// are passed on; a result of exactly max_rows is whole), and the input is dropped.
    #[tokio::test]
    async fn past_max_rows_the_stream_ends_with_an_error() {
        let dropped = Arc::new(AtomicBool::new(false));
        let limits = ResultLimits {
            timeout: Duration::from_secs(60),
            max_rows: 5,
        };
        let mut out = limited_stream(endless(&dropped), limits);
        for _ in 0..5 {
            assert!(out.next().await.unwrap().is_ok());
        }
        let err = out.next().await.unwrap().unwrap_err();
        assert!(
            err.to_string().contains("query.max_result_rows (5)"),
            "{err}"
        );
        assert!(dropped.load(Ordering::SeqCst));

        let ctx = with_limits(&SessionContext::new(), limits);
        let five = ctx
            .sql("SELECT * FROM generate_series(1, 5)")
            .await
            .unwrap();
        assert_eq!(five.collect().await.unwrap()[0].num_rows(), 5);
        let six = ctx
            .sql("SELECT * FROM generate_series(1, 6)")
            .await
            .unwrap();
        assert!(six.collect().await.is_err());
    }
}
