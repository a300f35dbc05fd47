//! A job on the cluster ends with its query. Ballista's client stops reading a job's
//! results when its stream is dropped (a timeout, a client gone away), but the job runs
//! on to its end on the executors; here each distributed plan is wrapped so that
//! dropping its stream before the last batch asks the scheduler to cancel the job.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use ballista_core::execution_plans::DistributedQueryExec;
use ballista_core::serde::protobuf::CancelJobParams;
use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use datafusion_proto::protobuf::LogicalPlanNode;
use futures::Stream;

type Distributed = DistributedQueryExec<LogicalPlanNode>;

/// Ballista's query planner, each distributed plan it makes wrapped in [`CancelOnDropExec`].
#[derive(Debug)]
pub struct CancellingPlanner {
    pub inner: Arc<dyn QueryPlanner + Send + Sync>,
    /// `http://host:port`
    pub scheduler: String,
}

#[async_trait]
impl QueryPlanner for CancellingPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let plan = self
            .inner
            .create_physical_plan(logical_plan, session)
            .await?;
        if plan.downcast_ref::<Distributed>().is_none() {
            return Ok(plan);
        }
        Ok(Arc::new(CancelOnDropExec {
            inner: plan,
            scheduler: self.scheduler.clone(),
        }))
    }
}

/// A Ballista job whose stream cancels it when dropped before its end.
#[derive(Debug)]
pub struct CancelOnDropExec {
    inner: Arc<dyn ExecutionPlan>,
    scheduler: String,
}

impl DisplayAs for CancelOnDropExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "CancelOnDropExec")
    }
}

impl ExecutionPlan for CancelOnDropExec {
    fn name(&self) -> &str {
        "CancelOnDropExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.inner.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.inner]
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
            Ok([inner]) => Ok(Arc::new(CancelOnDropExec {
                inner,
                scheduler: self.scheduler.clone(),
            })),
            Err(_) => Err(DataFusionError::Internal(
                "CancelOnDropExec takes one input".into(),
            )),
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        Ok(Box::pin(CancelOnDrop {
            stream: self.inner.execute(partition, context)?,
            plan: Arc::clone(&self.inner),
            scheduler: self.scheduler.clone(),
            ended: false,
        }))
    }
}

struct CancelOnDrop {
    stream: SendableRecordBatchStream,
    /// Knows the job's id once the scheduler has taken it.
    plan: Arc<dyn ExecutionPlan>,
    scheduler: String,
    /// The last batch (or an error, which ends the job) was read.
    ended: bool,
}

impl Stream for CancelOnDrop {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.stream.as_mut().poll_next(cx);
        if matches!(next, Poll::Ready(None | Some(Err(_)))) {
            self.ended = true;
        }
        next
    }
}

impl RecordBatchStream for CancelOnDrop {
    fn schema(&self) -> SchemaRef {
        self.stream.schema()
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let job = (self.plan.downcast_ref::<Distributed>()).and_then(Distributed::job_id);
        let (Some(job), Ok(runtime)) = (job, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let scheduler = self.scheduler.clone();
        runtime.spawn(async move {
            let cancelled = async {
                let mut client = SchedulerGrpcClient::connect(scheduler).await?;
                let params = CancelJobParams {
                    job_id: job.to_string(),
                };
                client.cancel_job(params).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            match cancelled.await {
                Ok(()) => tracing::info!(%job, "query ended early: Ballista job cancelled"),
                Err(e) => tracing::warn!(%job, error = %e, "query ended early: cancelling its Ballista job failed"),
            }
        });
    }
}
