// Link-time facts about libtorch for every binary and test of this package:
// an rpath to libtorch's directory (so no `LD_LIBRARY_PATH` is ever needed)
// and, where the wheel carries CUDA, a forced dependency on `libtorch_cuda`
// (the linker's `--as-needed` would drop it, and CUDA would then be absent).
// `torch-sys` announces the directory as `DEP_TCH_LIBTORCH_LIB`.
//
// For contrast-nn itself it also compiles two small C++ shims against
// libtorch's headers, found beside its library directory as in the PyTorch
// wheel: `src/autocast.cpp` (autocast with a chosen dtype) and
// `src/grad_hooks.cpp` (post-accumulate gradient hooks); tch exposes neither.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    if std::env::var("CARGO_PKG_NAME").as_deref() == Ok("contrast-nn") {
        compile_shim(std::path::Path::new(&dir));
    }
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

/// The C++ shims into a static library linked into contrast-nn.
fn compile_shim(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=src/autocast.cpp");
    println!("cargo:rerun-if-changed=src/grad_hooks.cpp");
    let include = lib.join("../include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        // The functions called take no std::string, so the ABI flag does not change their symbols.
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .file("src/autocast.cpp")
        .file("src/grad_hooks.cpp")
        .compile("contrast_autocast");
}
