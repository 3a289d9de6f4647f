//! A small ONNX writer: [`GraphBuilder`] collects a graph's inputs, initializers (weights),
//! nodes and outputs, and [`GraphBuilder::into_model_bytes`] encodes the `ModelProto` (IR version
//! 8, the default opset 17) with the hand-written protobuf encoder of [`proto`].
//!
//! Why hand-written: ONNX is protobuf, and the messages a feed-forward inference graph needs are
//! few (`ModelProto`, `OperatorSetIdProto`, `GraphProto`, `NodeProto`, `AttributeProto`,
//! `TensorProto`, `ValueInfoProto`, `TypeProto`, `TensorShapeProto`), each with a handful of
//! scalar, string and nested fields. `prost` would compile `onnx.proto` at build time and needs
//! `protoc`; the crates that ship generated ONNX types are runtimes (tract) or pull in a protobuf
//! stack far larger than this file. The field numbers below are those of `onnx.proto`, and the
//! output is checked by running it in onnxruntime (`crates/trainer/tests/onnx_export.rs`).
//!
//! The builder checks the wiring as it goes: every node input must name a graph input, an
//! initializer or an earlier node's output, so a graph is topologically sorted by construction;
//! names are unique (a taken name gets a `_N` suffix).
//!
//! ```
//! use facerec_onnx::{Attr, Dim, GraphBuilder};
//! let mut g = GraphBuilder::new("tiny");
//! let x = g.input("input", &[Dim::Named("batch".into()), Dim::Fixed(4)]);
//! let w = g.initializer("fc.weight", &[2, 4], vec![0.5; 8]);
//! let y = g.node("Gemm", "embedding", &[&x, &w], vec![Attr::int("transB", 1)]);
//! g.output(&y, &[Dim::Named("batch".into()), Dim::Fixed(2)]);
//! let bytes = g.into_model_bytes("facerec");
//! assert!(!bytes.is_empty());
//! ```

pub mod proto;

use proto::Message;
use std::collections::HashSet;

/// The ONNX IR version written (IR 8 goes with opsets up to 17/18).
pub const IR_VERSION: i64 = 8;
/// The default operator set of the `ai.onnx` domain.
pub const OPSET: i64 = 17;

/// `TensorProto.DataType` values used here.
pub mod data_type {
    /// 32-bit float.
    pub const FLOAT: i64 = 1;
    /// 64-bit signed integer.
    pub const INT64: i64 = 7;
}

/// One dimension of a graph input or output: a fixed size or a named (dynamic) axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size (`dim_value`).
    Fixed(i64),
    /// A symbolic size (`dim_param`), e.g. `"batch"`.
    Named(String),
}

/// A node attribute (`AttributeProto`): a name and a value.
#[derive(Debug, Clone, PartialEq)]
pub struct Attr {
    /// The attribute name, e.g. `"strides"`.
    pub name: String,
    /// Its value.
    pub value: AttrValue,
}

/// An attribute value of one of the types the builder writes.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// `INT` (type 2).
    Int(i64),
    /// `FLOAT` (type 1).
    Float(f32),
    /// `INTS` (type 7).
    Ints(Vec<i64>),
    /// `STRING` (type 3).
    String(String),
}

impl Attr {
    /// An `INT` attribute.
    pub fn int(name: &str, v: i64) -> Self {
        Attr {
            name: name.into(),
            value: AttrValue::Int(v),
        }
    }
    /// A `FLOAT` attribute.
    pub fn float(name: &str, v: f32) -> Self {
        Attr {
            name: name.into(),
            value: AttrValue::Float(v),
        }
    }
    /// An `INTS` attribute.
    pub fn ints(name: &str, v: &[i64]) -> Self {
        Attr {
            name: name.into(),
            value: AttrValue::Ints(v.to_vec()),
        }
    }
    /// A `STRING` attribute.
    pub fn string(name: &str, v: &str) -> Self {
        Attr {
            name: name.into(),
            value: AttrValue::String(v.into()),
        }
    }

    fn encode(&self) -> Message {
        // AttributeProto: name 1, f 2, i 3, s 4, ints 8, type 20.
        let mut m = Message::new();
        m.string(1, &self.name);
        match &self.value {
            AttrValue::Float(v) => {
                m.float(2, *v).int(20, 1);
            }
            AttrValue::Int(v) => {
                m.int(3, *v).int(20, 2);
            }
            AttrValue::String(v) => {
                m.string(4, v).int(20, 3);
            }
            AttrValue::Ints(v) => {
                m.packed_ints(8, v).int(20, 7);
            }
        }
        m
    }
}

#[derive(Debug)]
struct Node {
    op: String,
    name: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attrs: Vec<Attr>,
}

#[derive(Debug)]
struct Initializer {
    name: String,
    dims: Vec<i64>,
    data_type: i64,
    raw: Vec<u8>,
}

#[derive(Debug)]
struct ValueInfo {
    name: String,
    dims: Vec<Dim>,
}

/// Builds one ONNX graph (float32 inputs and outputs) node by node; see the crate docs.
#[derive(Debug)]
pub struct GraphBuilder {
    name: String,
    opset: i64,
    inputs: Vec<ValueInfo>,
    outputs: Vec<ValueInfo>,
    initializers: Vec<Initializer>,
    nodes: Vec<Node>,
    /// Every value name defined so far (inputs, initializers, node outputs).
    values: HashSet<String>,
    doc: String,
}

impl GraphBuilder {
    /// An empty graph called `name`, for opset [`OPSET`].
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            name: name.into(),
            opset: OPSET,
            inputs: Vec::new(),
            outputs: Vec::new(),
            initializers: Vec::new(),
            nodes: Vec::new(),
            values: HashSet::new(),
            doc: String::new(),
        }
    }

    /// Sets the graph's documentation string (shown by model viewers).
    pub fn set_doc(&mut self, doc: &str) {
        self.doc = doc.into();
    }

    /// The operator set version the model declares.
    pub fn opset(&self) -> i64 {
        self.opset
    }

    /// A name not yet used: `hint`, else `hint_1`, `hint_2`, ...
    fn fresh(&mut self, hint: &str) -> String {
        let mut name = hint.to_string();
        let mut k = 1;
        while self.values.contains(&name) {
            name = format!("{hint}_{k}");
            k += 1;
        }
        self.values.insert(name.clone());
        name
    }

    /// Declares a float32 graph input; returns its value name.
    ///
    /// # Panics
    /// If `name` is already taken (an input's name is part of the model's interface).
    pub fn input(&mut self, name: &str, dims: &[Dim]) -> String {
        assert!(
            !self.values.contains(name),
            "graph input {name:?}: the name is taken"
        );
        let name = self.fresh(name);
        self.inputs.push(ValueInfo {
            name: name.clone(),
            dims: dims.to_vec(),
        });
        name
    }

    /// A float32 initializer (a weight) of shape `dims`, row-major; returns its value name.
    ///
    /// # Panics
    /// If `data.len()` differs from the product of `dims`.
    pub fn initializer(&mut self, name: &str, dims: &[i64], data: Vec<f32>) -> String {
        let n: i64 = dims.iter().product();
        assert_eq!(
            data.len() as i64,
            n,
            "initializer {name}: {} values for shape {dims:?}",
            data.len()
        );
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, dims, data_type::FLOAT, raw)
    }

    /// An int64 initializer (shapes for `Reshape`, axes); returns its value name.
    ///
    /// # Panics
    /// If `data.len()` differs from the product of `dims`.
    pub fn initializer_i64(&mut self, name: &str, dims: &[i64], data: &[i64]) -> String {
        let n: i64 = dims.iter().product();
        assert_eq!(
            data.len() as i64,
            n,
            "initializer {name}: {} values for shape {dims:?}",
            data.len()
        );
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, dims, data_type::INT64, raw)
    }

    fn push_initializer(
        &mut self,
        name: &str,
        dims: &[i64],
        data_type: i64,
        raw: Vec<u8>,
    ) -> String {
        let name = self.fresh(name);
        self.initializers.push(Initializer {
            name: name.clone(),
            dims: dims.to_vec(),
            data_type,
            raw,
        });
        name
    }

    /// A node `op` (of the `ai.onnx` domain) with one output named after `hint`; returns the
    /// output's value name. An empty input name stands for an omitted optional input.
    ///
    /// # Panics
    /// If an input names no value defined so far.
    pub fn node(&mut self, op: &str, hint: &str, inputs: &[&str], attrs: Vec<Attr>) -> String {
        self.node_multi(op, hint, inputs, attrs, 1).remove(0)
    }

    /// A node with `n_outputs` outputs (`hint`, `hint_1`, ... when taken); returns their names.
    ///
    /// # Panics
    /// If an input names no value defined so far.
    pub fn node_multi(
        &mut self,
        op: &str,
        hint: &str,
        inputs: &[&str],
        attrs: Vec<Attr>,
        n_outputs: usize,
    ) -> Vec<String> {
        for i in inputs {
            assert!(
                i.is_empty() || self.values.contains(*i),
                "{op} node {hint:?}: input {i:?} is not defined yet"
            );
        }
        let outputs: Vec<String> = (0..n_outputs).map(|_| self.fresh(hint)).collect();
        self.nodes.push(Node {
            op: op.into(),
            name: format!("{op}:{}", outputs[0]),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.clone(),
            attrs,
        });
        outputs
    }

    /// Declares the value `name` a float32 graph output of shape `dims`.
    ///
    /// # Panics
    /// If `name` is not a defined value.
    pub fn output(&mut self, name: &str, dims: &[Dim]) {
        assert!(
            self.values.contains(name),
            "graph output {name:?} is not a defined value"
        );
        self.outputs.push(ValueInfo {
            name: name.into(),
            dims: dims.to_vec(),
        });
    }

    /// The number of nodes so far.
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The op types of the nodes, in order.
    pub fn op_types(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.op.as_str()).collect()
    }

    /// The number of float values held by the initializers.
    pub fn num_weights(&self) -> usize {
        self.initializers
            .iter()
            .filter(|i| i.data_type == data_type::FLOAT)
            .map(|i| i.raw.len() / 4)
            .sum()
    }

    fn encode_graph(&self) -> Message {
        // GraphProto: node 1, name 2, initializer 5, doc_string 10, input 11, output 12.
        let mut g = Message::new();
        for n in &self.nodes {
            // NodeProto: input 1, output 2, name 3, op_type 4, attribute 5.
            let mut m = Message::new();
            for i in &n.inputs {
                m.repeated_string(1, i);
            }
            for o in &n.outputs {
                m.repeated_string(2, o);
            }
            m.string(3, &n.name).string(4, &n.op);
            for a in &n.attrs {
                m.message(5, &a.encode());
            }
            g.message(1, &m);
        }
        g.string(2, &self.name);
        for t in &self.initializers {
            // TensorProto: dims 1, data_type 2, name 8, raw_data 9 (little-endian).
            let mut m = Message::new();
            m.packed_ints(1, &t.dims)
                .int(2, t.data_type)
                .string(8, &t.name)
                .bytes(9, &t.raw);
            g.message(5, &m);
        }
        g.string(10, &self.doc);
        for v in &self.inputs {
            g.message(11, &value_info(v));
        }
        for v in &self.outputs {
            g.message(12, &value_info(v));
        }
        g
    }

    /// Encodes the `ModelProto`: IR version [`IR_VERSION`], producer `producer` (with this crate's
    /// version), one opset import (`ai.onnx`, [`GraphBuilder::opset`]) and the graph.
    pub fn into_model_bytes(self, producer: &str) -> Vec<u8> {
        // ModelProto: ir_version 1, producer_name 2, producer_version 3, graph 7, opset_import 8.
        // OperatorSetIdProto: domain 1 (empty = ai.onnx), version 2.
        let mut opset = Message::new();
        opset.int(2, self.opset);
        let mut m = Message::new();
        m.int(1, IR_VERSION)
            .string(2, producer)
            .string(3, env!("CARGO_PKG_VERSION"))
            .message(7, &self.encode_graph())
            .message(8, &opset);
        m.into_bytes()
    }
}

/// `ValueInfoProto { name 1, type 2: TypeProto { tensor_type 1: { elem_type 1 = FLOAT, shape 2:
/// TensorShapeProto { dim 1: { dim_value 1 | dim_param 2 } } } } }`.
fn value_info(v: &ValueInfo) -> Message {
    let mut shape = Message::new();
    for d in &v.dims {
        let mut dim = Message::new();
        match d {
            Dim::Fixed(n) => {
                dim.int(1, *n);
            }
            Dim::Named(s) => {
                dim.string(2, s);
            }
        }
        shape.message(1, &dim);
    }
    let mut tensor = Message::new();
    tensor.int(1, data_type::FLOAT).message(2, &shape);
    let mut ty = Message::new();
    ty.message(1, &tensor);
    let mut m = Message::new();
    m.string(1, &v.name).message(2, &ty);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal reader of the wire format: the (field, wire type, payload) triples of one
    /// message, to check what the builder wrote.
    fn fields(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        fn varint(b: &mut &[u8]) -> u64 {
            let (mut v, mut s) = (0u64, 0);
            loop {
                let byte = b[0];
                *b = &b[1..];
                v |= u64::from(byte & 0x7f) << s;
                s += 7;
                if byte < 0x80 {
                    return v;
                }
            }
        }
        let mut out = Vec::new();
        while !b.is_empty() {
            let key = varint(&mut b);
            let (field, wire) = ((key >> 3) as u32, (key & 7) as u32);
            let payload = match wire {
                0 => {
                    let v = varint(&mut b);
                    let mut p = Vec::new();
                    proto::put_varint(&mut p, v);
                    p
                }
                2 => {
                    let n = varint(&mut b) as usize;
                    let p = b[..n].to_vec();
                    b = &b[n..];
                    p
                }
                5 => {
                    let p = b[..4].to_vec();
                    b = &b[4..];
                    p
                }
                w => panic!("unexpected wire type {w}"),
            };
            out.push((field, wire, payload));
        }
        out
    }

    fn tiny() -> GraphBuilder {
        let mut g = GraphBuilder::new("tiny");
        let x = g.input("input", &[Dim::Named("batch".into()), Dim::Fixed(3)]);
        let w = g.initializer("fc.weight", &[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let y = g.node("Gemm", "embedding", &[&x, &w], vec![Attr::int("transB", 1)]);
        g.output(&y, &[Dim::Named("batch".into()), Dim::Fixed(2)]);
        g
    }

    #[test]
    fn the_model_has_ir_version_opset_and_graph() {
        let bytes = tiny().into_model_bytes("facerec");
        let top = fields(&bytes);
        let nums: Vec<u32> = top.iter().map(|f| f.0).collect();
        assert_eq!(nums, [1, 2, 3, 7, 8]);
        assert_eq!(top[0].2, [8]); // ir_version 8
        assert_eq!(top[1].2, b"facerec");
        assert_eq!(fields(&top[4].2), [(2, 0, vec![17])]); // opset 17, default domain
        let graph = fields(&top[3].2);
        let nums: Vec<u32> = graph.iter().map(|f| f.0).collect();
        assert_eq!(nums, [1, 2, 5, 11, 12]);
        let node = fields(&graph[0].2);
        assert_eq!(node[0], (1, 2, b"input".to_vec()));
        assert_eq!(node[1], (1, 2, b"fc.weight".to_vec()));
        assert_eq!(node[2], (2, 2, b"embedding".to_vec()));
        assert_eq!(node[4], (4, 2, b"Gemm".to_vec()));
        let attr = fields(&node[5].2);
        assert_eq!(
            attr,
            [
                (1, 2, b"transB".to_vec()),
                (3, 0, vec![1]),
                (20, 0, vec![2])
            ]
        );
        let init = fields(&graph[2].2);
        assert_eq!(init[0], (1, 2, vec![2, 3])); // packed dims
        assert_eq!(init[1], (2, 0, vec![1])); // FLOAT
        assert_eq!(init[2], (8, 2, b"fc.weight".to_vec()));
        assert_eq!(init[3].2.len(), 24);
        assert_eq!(&init[3].2[4..8], &2.0f32.to_le_bytes());
        // input: name, type.tensor_type{elem_type 1, shape{dim{dim_param "batch"}, dim{dim_value 3}}}
        let input = fields(&graph[3].2);
        assert_eq!(input[0].2, b"input");
        let tensor = fields(&fields(&input[1].2)[0].2);
        assert_eq!(tensor[0], (1, 0, vec![1]));
        let dims = fields(&tensor[1].2);
        assert_eq!(fields(&dims[0].2), [(2, 2, b"batch".to_vec())]);
        assert_eq!(fields(&dims[1].2), [(1, 0, vec![3])]);
    }

    #[test]
    fn names_are_unique_and_wiring_is_checked() {
        let mut g = tiny();
        let a = g.node("Relu", "embedding", &["embedding"], vec![]);
        assert_eq!(a, "embedding_1");
        assert_eq!(g.op_types(), ["Gemm", "Relu"]);
        assert_eq!(g.num_weights(), 6);
        let r = std::panic::catch_unwind(move || {
            let mut g = g;
            g.node("Relu", "y", &["nowhere"], vec![]);
        });
        assert!(r.is_err());
    }
}
