//! `funnel(campaign, steps, window [, breakdown])` in SQL: the funnel plan as a table,
//! so SQL clients (psql, Grafana) get the numbers and `EXPLAIN` shows the plan.
//!
//! ```sql
//! SELECT * FROM funnel('parcel-lottery', 'package,scan,view,draw', '24h', 'channel');
//! ```
//!
//! One row per (value, step): `value` is the breakdown value (NULL: the total),
//! `step` is 0-based, then `users`, `pending` and `median_seconds` as in `/v1/funnel`.
//! It runs the plan of [`super::engine::funnel_plan`].

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::expressions::col;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::scalar::ScalarValue;
use serde::{Deserialize, Serialize};

use super::engine::{FoldExchange, plan_in};
use super::plan::{FunnelQuery, funnel_schema};
use super::spec::FunnelRequest;
use crate::session::FunnelClock;

/// The `funnel` table function over the `events` table.
#[derive(Debug)]
pub struct FunnelFunction {
    /// "Now" for its funnels, and the `events` table they read.
    pub clock: FunnelClock,
}

impl TableFunctionImpl for FunnelFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> DfResult<Arc<dyn TableProvider>> {
        const USAGE: &str = "funnel(campaign, steps, window [, breakdown]): \
            string literals, e.g. funnel('c', 'scan,view', '24h', 'channel')";
        let text: Vec<String> = (args.exprs().iter())
            .map(|e| match e {
                Expr::Literal(
                    ScalarValue::Utf8(Some(s))
                    | ScalarValue::Utf8View(Some(s))
                    | ScalarValue::LargeUtf8(Some(s)),
                    _,
                ) => Ok(s.clone()),
                Expr::Literal(ScalarValue::Int64(Some(n)), _) => Ok(n.to_string()),
                other => Err(DataFusionError::Plan(format!("{USAGE}; got {other}"))),
            })
            .collect::<DfResult<_>>()?;
        let [campaign, steps, window, rest @ ..] = text.as_slice() else {
            return Err(DataFusionError::Plan(USAGE.into()));
        };
        if rest.len() > 1 {
            return Err(DataFusionError::Plan(USAGE.into()));
        }
        let mut request = serde_json::json!({
            "campaign": campaign,
            "steps": steps.split(',').map(str::trim).collect::<Vec<_>>(),
            "window": window,
        });
        if let Some(breakdown) = rest.first() {
            request["breakdown"] = breakdown.as_str().into();
        }
        let spec = serde_json::from_value::<FunnelRequest>(request)
            .map_err(|e| DataFusionError::Plan(format!("funnel: {e}")))?
            .into_spec()
            .map_err(|e| DataFusionError::Plan(format!("funnel: {e}")))?;
        let (as_of, events) = self.clock.pin();
        Ok(Arc::new(FunnelTable {
            events,
            query: Arc::new(FunnelQuery::new(&spec, as_of, None)),
            columns: FunnelColumns::Sql,
            exchange: FoldExchange::Broadcast,
        }))
    }
}

/// Which of the merge's columns a [`FunnelTable`] shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FunnelColumns {
    /// SQL's `funnel(...)`: value, step, users, pending, median_seconds (no trend bucket).
    Sql,
    /// All of them: what the funnel and trend reports are built from.
    Report,
}

impl FunnelColumns {
    fn indices(self) -> &'static [usize] {
        match self {
            Self::Sql => &[0, 2, 3, 4, 5],
            Self::Report => &[0, 1, 2, 3, 4, 5],
        }
    }
}

/// One funnel question as a table: scanning it runs the funnel plan.
#[derive(Debug)]
pub struct FunnelTable {
    pub events: Arc<dyn TableProvider>,
    pub query: Arc<FunnelQuery>,
    pub columns: FunnelColumns,
    /// Broadcast in one process; where a distributed engine decodes the table to plan it,
    /// a repartition by user_id (see `crate::wire`).
    pub exchange: FoldExchange,
}

#[async_trait]
impl TableProvider for FunnelTable {
    fn schema(&self) -> SchemaRef {
        Arc::new(
            funnel_schema()
                .project(self.columns.indices())
                .expect("columns of the funnel schema"),
        )
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let events = Arc::clone(&self.events);
        let plan = plan_in(state, events, Arc::clone(&self.query), self.exchange).await?;
        let columns = self.columns.indices();
        let wanted: Vec<usize> = match projection {
            Some(p) => p.iter().map(|&i| columns[i]).collect(),
            None => columns.to_vec(),
        };
        if wanted.iter().copied().eq(0..plan.schema().fields().len()) {
            return Ok(plan);
        }
        let schema = plan.schema();
        let exprs = wanted
            .into_iter()
            .map(|i| {
                let name = schema.field(i).name();
                Ok((col(name, &schema)?, name.clone()))
            })
            .collect::<DfResult<Vec<_>>>()?;
        Ok(Arc::new(ProjectionExec::try_new(exprs, plan)?))
    }
}
