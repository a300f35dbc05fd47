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
use funnelhouse_schemas::time::now_micros;

use super::engine::{FoldExchange, plan_in};
use super::plan::funnel_schema;
use super::spec::{FunnelRequest, FunnelSpec};

/// The `funnel` table function over the `events` table.
#[derive(Debug)]
pub struct FunnelFunction {
    pub events: Arc<dyn TableProvider>,
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
        Ok(Arc::new(FunnelTable {
            events: Arc::clone(&self.events),
            spec,
        }))
    }
}

/// One funnel question as a table.
#[derive(Debug)]
struct FunnelTable {
    events: Arc<dyn TableProvider>,
    spec: FunnelSpec,
}

/// The columns of `funnel(...)`: the merge's, less the trend bucket (always NULL here).
const COLUMNS: [usize; 5] = [0, 2, 3, 4, 5];

#[async_trait]
impl TableProvider for FunnelTable {
    fn schema(&self) -> SchemaRef {
        Arc::new(
            funnel_schema()
                .project(&COLUMNS)
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
        let plan = plan_in(
            state,
            events,
            &self.spec,
            now_micros(),
            None,
            FoldExchange::Broadcast,
        )
        .await?;
        let schema = plan.schema();
        let wanted = match projection {
            Some(p) => p.iter().map(|&i| COLUMNS[i]).collect(),
            None => COLUMNS.to_vec(),
        };
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
