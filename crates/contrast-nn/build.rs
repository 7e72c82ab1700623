// Link-time facts about libtorch for every binary and test of this package:
// an rpath to libtorch's directory (so no `LD_LIBRARY_PATH` is ever needed)
// and, where the wheel carries CUDA, a forced dependency on `libtorch_cuda`
// (the linker's `--as-needed` would drop it, and CUDA would then be absent).
// `torch-sys` announces the directory as `DEP_TCH_LIBTORCH_LIB`.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
