fn main() -> std::process::ExitCode {
    digestfs::cli::main()
}
