fn main() {
    std::process::exit(butler::cli::main());
}
