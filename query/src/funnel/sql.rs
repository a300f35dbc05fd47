//! `funnel(campaign, steps, window [, breakdown])` in SQL: the funnel plan as a table,
//! so SQL clients (psql, Grafana) get the numbers and `EXPLAIN` shows the plan.
//!
//! ```sql
//! SELECT * FROM funnel('parcel-lottery', 'package,scan,view,draw', '24h', 'channel');
//! ```
//!
//! One row per (value, step): `value` is the breakdown value (NULL: the total),
//! `step` is 0-based, then `users`, `pending` and `median_seconds` as in `/v1/funnel`.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl};
use datafusion::datasource::{TableProvider, TableType, provider_as_source};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{Expr, LogicalPlanBuilder};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::scalar::ScalarValue;
use funnelhouse_schemas::time::now_micros;

use super::engine::{FoldExchange, plan_over_scan, scan_filter_and_columns};
use super::fold::StepMatcher;
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

#[async_trait]
impl TableProvider for FunnelTable {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        funnel_schema()
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
        let (filter, columns) = scan_filter_and_columns(&self.spec, &StepMatcher::new(&self.spec));
        let scan =
            LogicalPlanBuilder::scan("events", provider_as_source(Arc::clone(&self.events)), None)?
                .filter(filter)?
                .project(columns)?
                .build()?;
        let scan = state.create_physical_plan(&scan).await?;
        let partitions = state.config().target_partitions().max(1);
        let plan = plan_over_scan(
            scan,
            &self.spec,
            now_micros(),
            None,
            FoldExchange::Broadcast,
            partitions,
        )?;
        Ok(match projection {
            Some(columns) => {
                let schema = plan.schema();
                let exprs = columns.iter().map(|&i| {
                    let name = schema.field(i).name().clone();
                    let column: Arc<dyn datafusion::physical_expr::PhysicalExpr> = Arc::new(
                        datafusion::physical_expr::expressions::Column::new(&name, i),
                    );
                    (column, name)
                });
                Arc::new(ProjectionExec::try_new(exprs, plan)?)
            }
            None => plan,
        })
    }
}
