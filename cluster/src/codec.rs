//! Ballista's codecs, taught our tables, plan nodes and `window_funnel` (the forms are
//! [`funnelhouse_query::wire`]'s); everything else goes to Ballista's own. The client,
//! the scheduler and every executor must use these, or a plan with our parts fails to
//! decode with an error naming the part.

use std::sync::Arc;

use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::TableReference;
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{AggregateUDF, Extension, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use funnelhouse_query::{WindowFunnel, wire};

/// Our UDAF by name, for a process whose function registry lacks it.
fn window_funnel(name: &str) -> Option<Arc<AggregateUDF>> {
    let udaf = WindowFunnel::udaf();
    (name == udaf.name()).then(|| Arc::new(udaf))
}

/// Appends our bytes when `encoded` is ours (Some), else leaves the node to Ballista.
fn append(buf: &mut Vec<u8>, encoded: Option<Result<Vec<u8>>>) -> Option<Result<()>> {
    encoded.map(|bytes| bytes.map(|b| buf.extend_from_slice(&b)))
}

#[derive(Debug, Default)]
pub struct LogicalCodec {
    ballista: BallistaLogicalExtensionCodec,
}

impl LogicalExtensionCodec for LogicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> Result<Extension> {
        self.ballista.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> Result<()> {
        self.ballista.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        match wire::decode_table(buf) {
            Some(table) => table,
            None => self
                .ballista
                .try_decode_table_provider(buf, table_ref, schema, ctx),
        }
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        match append(buf, wire::encode_table(node.as_ref())) {
            Some(done) => done,
            None => self
                .ballista
                .try_encode_table_provider(table_ref, node, buf),
        }
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn FileFormatFactory>> {
        self.ballista.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn FileFormatFactory>,
    ) -> Result<()> {
        self.ballista.try_encode_file_format(buf, node)
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        match window_funnel(name) {
            Some(udaf) => Ok(udaf),
            None => self.ballista.try_decode_udaf(name, buf),
        }
    }
}

#[derive(Debug, Default)]
pub struct PhysicalCodec {
    ballista: BallistaPhysicalExtensionCodec,
}

impl PhysicalExtensionCodec for PhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match wire::decode_plan(buf, inputs) {
            Some(plan) => plan,
            None => self.ballista.try_decode(buf, inputs, ctx, converter),
        }
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        match append(buf, wire::encode_plan(node.as_ref())) {
            Some(done) => done,
            None => self.ballista.try_encode(node, buf, converter),
        }
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        match window_funnel(name) {
            Some(udaf) => Ok(udaf),
            None => self.ballista.try_decode_udaf(name, buf),
        }
    }
}
