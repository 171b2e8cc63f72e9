use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;

use super::*;
use lopper_core::ModelShape;

type B = Flex;
const D: burn_flex::FlexDevice = burn_flex::FlexDevice;

fn windows() -> Vec<Vec<u32>> {
    (0..3)
        .map(|r| {
            (0..9)
                .map(|t| ((t * 13 + r * 7 + 1) % 128) as u32)
                .collect()
        })
        .collect()
}

#[test]
fn wanda_sp_matches_a_hand_computation_from_the_taps() {
    let model = Llama::<B>::random(&ModelShape::tiny(), 3, &D).unwrap();
    let s = wanda_sp(&model, &windows(), 2).unwrap();
    // Recompute layer 1 by hand: collect the taps of one full batch, then the formula.
    let t = model.tokens(&windows()).unwrap();
    let mut o_in = None;
    let mut d_in = None;
    model
        .forward_tapped(t, None, |i, p, x| {
            if i == 1 {
                let v: Vec<f32> = x.clone().into_data().to_vec().unwrap();
                match p {
                    Tap::OProjInput => o_in = Some(v),
                    Tap::DownProjInput => d_in = Some(v),
                }
            }
        })
        .unwrap();
    let (o_in, d_in) = (o_in.unwrap(), d_in.unwrap());
    let n = 27; // tokens
    let a = model.layers[1].self_attn.as_ref().unwrap();
    let wo: Vec<f32> = a.o_proj.weight.val().into_data().to_vec().unwrap(); // [32 in, 32 out]
    let (hidden, width) = (32, 32);
    let col = |j: usize| -> f64 {
        let msq = (0..n)
            .map(|r| (o_in[r * width + j] as f64).powi(2))
            .sum::<f64>()
            / n as f64;
        let wabs = (0..hidden)
            .map(|o| wo[j * hidden + o].abs() as f64)
            .sum::<f64>()
            / hidden as f64;
        wabs * msq.sqrt()
    };
    // Group 1 = query heads 2, 3 (head_dim 8): columns 16..32, mean over the 2 heads.
    let want = (16..32).map(col).sum::<f64>() / 2.0;
    assert!(
        (s.kv_groups[1][1] - want).abs() < 1e-4 * want.abs(),
        "{} vs {want}",
        s.kv_groups[1][1]
    );
    let m = model.layers[1].mlp.as_ref().unwrap();
    let wd: Vec<f32> = m.down_proj.weight.val().into_data().to_vec().unwrap(); // [48, 32]
    let c = 5;
    let msq = (0..n)
        .map(|r| (d_in[r * 48 + c] as f64).powi(2))
        .sum::<f64>()
        / n as f64;
    let wabs = (0..hidden)
        .map(|o| wd[c * hidden + o].abs() as f64)
        .sum::<f64>()
        / hidden as f64;
    let want = wabs * msq.sqrt();
    assert!(
        (s.channels[1][c] - want).abs() < 1e-4 * want,
        "{} vs {want}",
        s.channels[1][c]
    );
    s.check(model.shape()).unwrap();
}

#[test]
fn magnitude_scores_a_hand_built_channel() {
    let mut model = Llama::<B>::random(&ModelShape::tiny(), 3, &D).unwrap();
    // Channel 2 of layer 0: gate row all 1, up row all 2, down column all -1 (hidden 32).
    let m = model.layers[0].mlp.as_mut().unwrap();
    let set = |p: &mut Param<Tensor<B, 2>>, dim: usize, v: f32| {
        let w = p.val();
        let dims = w.dims();
        let mut data: Vec<f32> = w.into_data().to_vec().unwrap();
        for r in 0..dims[0] {
            for c in 0..dims[1] {
                if (dim == 1 && c == 2) || (dim == 0 && r == 2) {
                    data[r * dims[1] + c] = v;
                }
            }
        }
        *p = Param::from_tensor(Tensor::from_data(TensorData::new(data, dims), &D));
    };
    set(&mut m.gate_proj.weight, 1, 1.0);
    set(&mut m.up_proj.weight, 1, 2.0);
    set(&mut m.down_proj.weight, 0, -1.0);
    let l1 = magnitude(&model, Norm::L1).unwrap();
    assert!((l1.channels[0][2] - 32.0 * (1.0 + 2.0 + 1.0)).abs() < 1e-4);
    let l2 = magnitude(&model, Norm::L2).unwrap();
    assert!((l2.channels[0][2] - (32.0f64 * (1.0 + 4.0 + 1.0)).sqrt()).abs() < 1e-4);
}

#[test]
fn no_calibration_data_is_an_error() {
    let model = Llama::<B>::random(&ModelShape::tiny(), 3, &D).unwrap();
    assert!(
        wanda_sp(&model, &[], 2)
            .unwrap_err()
            .to_string()
            .contains("calibration")
    );
}
