include!("../contrast-nn/build.rs");
