//! A TF 2.x-style JPEG signature in miniature: `tf.map_fn` as a control-flow-v2 `While` whose
//! body function decodes, resizes and scales, its images stacked by `TensorListStack`.

use std::collections::HashMap;

use edge_proto::tensorflow::{FunctionDef, FunctionDefLibrary, NameAttrList, OpDef, op_def};
use edge_runtime::bundle::manifest::{ResizeFilter, ResizePolicy};

use super::super::graph::attr;
use super::super::graph::test_util::{konst, op, placeholder, tensor_info as info};
use super::super::tensor::{Data, HostTensor};
use super::*;

fn int_const(name: &str, values: Vec<i32>) -> NodeDef {
    let shape = vec![values.len()];
    super::super::graph::const_node(
        name,
        &HostTensor {
            shape,
            data: Data::I32(values),
        },
    )
}

fn func(node: &mut NodeDef, key: &str, name: &str) {
    set_attr(
        node,
        key,
        Value::Func(NameAttrList {
            name: name.into(),
            ..Default::default()
        }),
    );
}

/// The body of `map_fn(preprocess_image, jpegs)`: returns `TensorListSetItem(acc, i, image)`
/// for loop variable 3 (the accumulator), or `returned` instead when given.
fn body(returned: Option<&str>) -> FunctionDef {
    let args = ["counter", "n", "i", "acc", "n2", "jpegs"];
    let nodes = vec![
        int_const("shape", vec![]),
        op("read", "TensorListGetItem", &["jpegs", "i", "shape:output:0"]),
        op("decode", "DecodeJpeg", &["read:item:0"]),
        op("cast", "Cast", &["decode:image:0"]),
        konst("scale", &[], vec![1.0 / 255.0]),
        op("convert", "Mul", &["cast:y:0", "scale:output:0"]),
        int_const("dim", vec![0]),
        op("expand", "ExpandDims", &["convert:z:0", "dim:output:0"]),
        int_const("size", vec![8, 8]),
        op("resize", "ResizeBilinear", &["expand:output:0", "size:output:0"]),
        op("squeeze", "Squeeze", &["resize:resized_images:0"]),
        konst("half", &[], vec![0.5]),
        op("sub", "Sub", &["squeeze:output:0", "half:output:0"]),
        konst("two", &[], vec![2.0]),
        op("mul", "Mul", &["sub:z:0", "two:output:0"]),
        op("write", "TensorListSetItem", &["acc", "i", "mul:z:0"]),
        op("next", "AddV2", &["i", "n:output:0"]),
    ];
    let arg = |name: &str| op_def::ArgDef {
        name: name.into(),
        ..Default::default()
    };
    let outs = ["counter_out", "n_out", "i_out", "acc_out", "n2_out", "jpegs_out"];
    let mut ret: HashMap<String, String> = args
        .iter()
        .zip(outs)
        .map(|(a, o)| (o.to_string(), a.to_string()))
        .collect();
    ret.insert(
        "acc_out".into(),
        returned.unwrap_or("write:output_handle:0").into(),
    );
    FunctionDef {
        signature: Some(OpDef {
            name: "map_while_body_15".into(),
            input_arg: args.iter().map(|a| arg(a)).collect(),
            output_arg: outs.iter().map(|a| arg(a)).collect(),
            ..Default::default()
        }),
        node_def: nodes,
        ret,
        ..Default::default()
    }
}

/// jpegs -> While(map_fn) -> TensorListStack -> Mean -> Softmax -> top_k -> scores / classes.
fn map_fn_graph(body: FunctionDef, stacked: bool) -> (GraphDef, SignatureDef) {
    let mut jpegs = placeholder("images", &[-1]);
    set_attr(&mut jpegs, "dtype", Value::Type(DataType::DtString as i32));
    let mut while_node = op(
        "map/while",
        "While",
        &["counter", "n", "i", "map/reserve", "n", "map/unstack"],
    );
    func(&mut while_node, "body", "map_while_body_15");
    func(&mut while_node, "cond", "map_while_cond_14");
    let images = if stacked {
        "map/stack"
    } else {
        "map/while/Identity_3"
    };
    let labels = HostTensor {
        shape: vec![3],
        data: Data::Str(vec![b"cat".to_vec(), b"dog".to_vec(), b"owl".to_vec()]),
    };
    let nodes = vec![
        jpegs,
        int_const("counter", vec![0]),
        int_const("n", vec![1]),
        int_const("i", vec![0]),
        int_const("map/element_shape", vec![-1]),
        op("map/reserve", "TensorListReserve", &["map/element_shape", "n"]),
        op(
            "map/unstack",
            "TensorListFromTensor",
            &["images", "map/element_shape"],
        ),
        while_node,
        op("map/while/Identity_3", "Identity", &["map/while:3"]),
        int_const("map/stack/element_shape", vec![8, 8, 3]),
        op(
            "map/stack",
            "TensorListStack",
            &["map/while/Identity_3", "map/stack/element_shape"],
        ),
        int_const("axes", vec![1, 2]),
        op("mean", "Mean", &[images, "axes"]),
        op("probabilities", "Softmax", &["mean"]),
        int_const("k", vec![2]),
        op("top_k", "TopKV2", &["probabilities", "k"]),
        op("scores", "Identity", &["top_k"]),
        super::super::graph::const_node("class_names", &labels),
        int_const("axis", vec![0]),
        op("classes", "GatherV2", &["class_names", "top_k:1", "axis"]),
    ];
    let graph = GraphDef {
        node: nodes,
        library: Some(FunctionDefLibrary {
            function: vec![body],
            ..Default::default()
        }),
        ..Default::default()
    };
    let sig = SignatureDef {
        inputs: HashMap::from([("images".to_string(), info("images:0", DataType::DtString))]),
        outputs: HashMap::from([
            ("scores".to_string(), info("scores:0", DataType::DtFloat)),
            ("classes".to_string(), info("classes:0", DataType::DtString)),
        ]),
        ..Default::default()
    };
    (graph, sig)
}

fn prepare_default(graph: &GraphDef, sig: &SignatureDef) -> Result<Cut, TfError> {
    prepare(graph, sig, "images", &LoadOptions::default())
}

#[test]
fn control_flow_v2_map_fn_is_cut_at_the_stacked_images_with_preprocessing_from_the_body() {
    let (graph, sig) = map_fn_graph(body(None), true);
    let cut = prepare_default(&graph, &sig).unwrap();
    let p = cut.preprocessing.expect("preprocessing detected");
    assert_eq!(
        (p.resize, p.filter),
        (ResizePolicy::Stretch, ResizeFilter::TfLegacyBilinear)
    );
    assert_eq!((p.mean, p.std), ([127.5; 3], [127.5; 3]));
    assert_eq!(
        cut.labels.as_deref(),
        Some(&["cat", "dog", "owl"].map(String::from)[..])
    );
    assert_eq!(cut.output.to_input(), "probabilities");
    // The network now reads a new float placeholder shaped by the stack's element shape.
    let mean = cut.graph.node.iter().find(|n| n.name == "mean").unwrap();
    assert_eq!(mean.input[0], cut.input);
    let input = cut.graph.node.iter().find(|n| n.name == cut.input).unwrap();
    match attr(input, "shape") {
        Some(Value::Shape(s)) => {
            assert_eq!(s.dim.iter().map(|d| d.size).collect::<Vec<_>>(), [1, 8, 8, 3]);
        }
        other => panic!("placeholder shape {other:?}"),
    }
    let notes = cut.notes.join("\n");
    assert!(
        notes.contains("TensorListStack")
            && notes
                .contains("control-flow-v2 While loop \"map/while\" (body function \"map_while_body_15\"")
            && notes.contains("DecodeJpeg (channels=0) -> Cast -> Mul -> ExpandDims -> ResizeBilinear"),
        "{notes}"
    );
}

#[test]
fn while_body_not_storing_a_list_item_is_refused_naming_the_loop_and_what_it_returns() {
    let (graph, sig) = map_fn_graph(body(Some("mul:z:0")), true);
    let msg = prepare_default(&graph, &sig).err().expect("refused").to_string();
    assert!(
        msg.contains(
            "control-flow-v2 While loop \"map/while\" (body function \"map_while_body_15\", loop variable 3)"
        ) && msg.contains("returns Mul \"mul\" for it, not a TensorListSetItem"),
        "{msg}"
    );

    let (mut graph, sig) = map_fn_graph(body(None), true);
    if let Some(l) = graph.library.as_mut() {
        l.function.clear();
    }
    let msg = prepare_default(&graph, &sig).err().expect("refused").to_string();
    assert!(
        msg.contains("\"map/while\"") && msg.contains("whose body is not in the graph's function library"),
        "{msg}"
    );
}

#[test]
fn unstacked_while_loop_output_is_refused_naming_the_loop_on_the_path() {
    let (graph, sig) = map_fn_graph(body(None), false);
    let err = prepare_default(&graph, &sig).err().expect("refused");
    assert!(err.is_unsupported_model());
    let msg = err.to_string();
    assert!(
        msg.contains("through Placeholder (node \"images\")")
            && msg.contains(
                "a control-flow-v2 While loop \"map/while\" (body \"map_while_body_15\") whose outputs no \
                 TensorListStack stacks"
            )
            && msg.contains("Softmax \"probabilities\""),
        "{msg}"
    );
}

#[test]
fn preprocessing_override_skips_reading_the_body() {
    let (mut graph, sig) = map_fn_graph(body(None), true);
    if let Some(l) = graph.library.as_mut() {
        l.function.clear();
    }
    let options = LoadOptions {
        preprocessing_override: true,
        ..Default::default()
    };
    let cut = prepare(&graph, &sig, "images", &options).unwrap();
    assert!(cut.preprocessing.is_none());
    assert!(cut.labels.is_some());
}
