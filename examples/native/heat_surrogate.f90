! The main job's heat simulation (src/caldera/sims/heat.py) in Fortran with MPI, calling the exported surrogate
! in-process through `use caldera`.
!
! Each rank integrates its own plates. Every window the surrogate maps (T, k) to T a span of explicit steps later:
! the span it was trained on, read from the package's metadata (`caldera.data.steps`, what `caldera export` recorded
! from the run's data.args.steps), or given as the 4th argument. The physics computes the same span, and rank 0
! prints every rank's relative L2 residual and the time of both. Each window starts new plates from the initial
! conditions the surrogate was trained on (hot spots on a cold plate): a state already diffused by a window lies
! outside its training data (going on from it, the residual of the 400-step surrogate grows 3 % -> 14 % -> 64 %).
! The surrogate's cost is fixed and the physics' grows with the span: the last line says where the two cross.
!   mpiexec -n 2 heat_surrogate_f90 EXPORT_DIR|PACKAGE.pt2 [PLATES_PER_RANK=8] [WINDOWS=3] [STEPS=the package's]
program heat_surrogate
  use, intrinsic :: iso_fortran_env, only: real32, real64, int64
  use mpi
  use caldera
  implicit none
  real(real64), parameter :: DT = 0.2d0       ! heat.py DT: stable since 4 * max(k) * dt <= 1
  real(real64), parameter :: PI = 3.14159265358979323846d0
  type(caldera_model) :: model
  character(len=4096) :: path, arg
  integer :: plates, windows, rank, nranks, ierr, g, p, w, status, r, steps, recorded
  character(len=:), allocatable :: text, origin
  integer(int64), allocatable :: shape(:)
  integer(int64) :: seed
  real(real64), allocatable :: t(:,:,:), k(:,:,:)
  real(real32), allocatable :: x(:,:,:,:), y(:,:,:,:)
  real(real64) :: t0, physics_s, surrogate_s, tp, ts, local(2), residuals(2), times(2), slowest(2), best(2)
  real(real64) :: c0, cpu(2)
  real(real64), allocatable :: all_res(:)

  call MPI_Init(ierr)
  call MPI_Comm_rank(MPI_COMM_WORLD, rank, ierr)
  call MPI_Comm_size(MPI_COMM_WORLD, nranks, ierr)
  call get_command_argument(1, path)
  plates = 8
  windows = 3
  if (command_argument_count() >= 2) then
    call get_command_argument(2, arg)
    read(arg, *) plates
  end if
  if (command_argument_count() >= 3) then
    call get_command_argument(3, arg)
    read(arg, *) windows
  end if
  steps = 0
  if (command_argument_count() >= 4) then
    call get_command_argument(4, arg)
    read(arg, *) steps
  end if

  if (caldera_load(model, trim(path), "cpu") /= CALDERA_OK) call stop_all(caldera_last_error())
  ! The span the surrogate replaces is the one it learnt: the run's data.args.steps, recorded in the package.
  if (caldera_metadata(model, "caldera.data.source", text) == CALDERA_OK) then
    if (text /= "heat") call stop_all("the model was trained on data '" // text // "', not the heat simulation")
  end if
  recorded = 0
  if (caldera_metadata(model, "caldera.data.steps", text) == CALDERA_OK) read(text, *) recorded
  if (steps > 0) then
    origin = "the command line"
    if (recorded > 0 .and. recorded /= steps .and. rank == 0) print '(a, i0, a, i0, a)', &
      'warning: the surrogate was trained for ', recorded, ' steps, not ', steps, ': the residual compares two spans'
  else if (recorded > 0) then
    steps = recorded
    origin = "the package's caldera.data.steps"
  else
    call stop_all(caldera_last_error() // ": give the span the surrogate replaces (its data.args.steps) as the " // &
                  "4th argument")
  end if
  if (rank == 0) print '(a, i0, a, a, a)', 'window: ', steps, ' explicit steps (from ', origin, ')'
  ! Fortran order (g, g, 2, batch): the C shape (batch, 2, g, g) reversed.
  if (caldera_input_shape(model, 1, shape) /= CALDERA_OK) call stop_all(caldera_last_error())
  if (size(shape) /= 4) call stop_all("the model takes (batch, 2, g, g) fields [T, k], not this one")
  if (shape(3) /= 2 .or. shape(1) /= shape(2)) call stop_all("the model takes (batch, 2, g, g) fields [T, k]")
  g = int(shape(1))
  allocate(t(g, g, plates), k(g, g, plates), x(g, g, 2, plates), y(g, g, 1, plates), all_res(nranks))

  seed = 88172645463325252_int64 + 7919_int64 * rank   ! each rank its own plates
  call new_plates()

  ! The first call pays one-off costs (page faults, thread pools, lazy kernels): time it apart.
  x(:, :, 1, :) = real(t, real32)
  x(:, :, 2, :) = real(k, real32)
  t0 = MPI_Wtime()
  if (caldera_run(model, x, y) /= CALDERA_OK) call stop_all(caldera_last_error())
  if (rank == 0) print '(a, f9.3, a)', 'first call (one-off set-up): ', (MPI_Wtime() - t0) * 1d3, ' ms'
  physics_s = 0
  surrogate_s = 0
  best = huge(1d0)
  cpu = 0
  do w = 1, windows
    call new_plates()
    x(:, :, 1, :) = real(t, real32)
    x(:, :, 2, :) = real(k, real32)
    call cpu_time(c0)
    t0 = MPI_Wtime()
    status = caldera_run(model, x, y)
    ts = MPI_Wtime() - t0
    cpu(2) = cpu(2) - c0
    call cpu_time(c0)
    cpu(2) = cpu(2) + c0
    if (status /= CALDERA_OK) call stop_all(caldera_last_error())
    t0 = MPI_Wtime()
    do p = 1, plates
      call simulate(g, steps, k(:, :, p), t(:, :, p))
    end do
    tp = MPI_Wtime() - t0
    cpu(1) = cpu(1) - c0
    call cpu_time(c0)
    cpu(1) = cpu(1) + c0
    physics_s = physics_s + tp
    surrogate_s = surrogate_s + ts
    best = min(best, [tp, ts])
    ! This rank's residual, and the global one from the summed squares.
    local = [sum((real(y(:, :, 1, :), real64) - t)**2), sum(t**2)]
    call MPI_Allreduce(local, residuals, 2, MPI_DOUBLE_PRECISION, MPI_SUM, MPI_COMM_WORLD, ierr)
    call MPI_Gather(sqrt(local(1) / (local(2) + 1d-30)), 1, MPI_DOUBLE_PRECISION, all_res, 1, &
                    MPI_DOUBLE_PRECISION, 0, MPI_COMM_WORLD, ierr)
    times = [tp, ts]
    call MPI_Reduce(times, slowest, 2, MPI_DOUBLE_PRECISION, MPI_MAX, 0, MPI_COMM_WORLD, ierr)
    if (rank == 0) then
      do r = 1, nranks
        print '(a, i0, a, i0, a, es11.4)', 'window ', w, ' rank ', r - 1, ': residual ', all_res(r)
      end do
      print '(a, i0, a, es11.4, a, f9.3, a, f9.3, a)', 'window ', w, ': global residual ', &
        sqrt(residuals(1) / (residuals(2) + 1d-30)), ' (relative L2)  physics ', slowest(1) * 1d3, &
        ' ms  surrogate ', slowest(2) * 1d3, ' ms (slowest rank)'
    end if
  end do
  if (rank == 0) print '(a, f9.3, a, f9.3, a, i0, a, i0, a, i0, a, i0, a, i0, a, i0, a)', 'total on rank 0: physics ', &
    physics_s * 1d3, ' ms, surrogate ', surrogate_s * 1d3, ' ms for ', plates, ' plates of ', g, 'x', g, &
    ' per rank on ', nranks, ' ranks, ', windows, ' windows of ', steps, ' steps'
  ! On a shared machine a window is often pre-empted: each rank's fastest window is its cost undisturbed, and the
  ! slowest rank's sets the pace. The surrogate's cost does not depend on the span, the physics' is proportional to it.
  call MPI_Reduce(best, slowest, 2, MPI_DOUBLE_PRECISION, MPI_MAX, 0, MPI_COMM_WORLD, ierr)
  if (rank == 0) print '(a, f9.3, a, f9.3, a, f7.2, a, i0, a)', 'fastest window (slowest rank): physics ', &
    slowest(1) * 1d3, ' ms, surrogate ', slowest(2) * 1d3, ' ms; surrogate / physics time: ', slowest(2) / slowest(1), &
    ' (cross-over at about ', nint(steps * slowest(2) / slowest(1)), ' steps: beyond it the surrogate is faster)'
  ! The process's CPU time does not count the time other processes held the core: the work itself.
  call MPI_Reduce(cpu / windows, slowest, 2, MPI_DOUBLE_PRECISION, MPI_MAX, 0, MPI_COMM_WORLD, ierr)
  if (rank == 0) print '(a, f9.3, a, f9.3, a, f7.2, a, i0, a)', 'CPU time per window (slowest rank): physics ', &
    slowest(1) * 1d3, ' ms, surrogate ', slowest(2) * 1d3, ' ms; surrogate / physics: ', slowest(2) / slowest(1), &
    ' (cross-over at about ', nint(steps * slowest(2) / slowest(1)), ' steps)'
  call caldera_free(model)
  call MPI_Finalize(ierr)

contains

  subroutine new_plates()
    do p = 1, plates
      call initial(seed, g, t(:, :, p), k(:, :, p))
    end do
  end subroutine new_plates

  subroutine stop_all(message)
    character(len=*), intent(in) :: message
    write(0, '(a, i0, a, a)') 'heat_surrogate_f90 rank ', rank, ': ', message
    call MPI_Abort(MPI_COMM_WORLD, 1, ierr)
  end subroutine stop_all

  ! xorshift64*: initial conditions need not match NumPy's, only its distribution.
  function uniform(s, lo, hi) result(u)
    integer(int64), intent(inout) :: s
    real(real64), intent(in) :: lo, hi
    real(real64) :: u
    s = ieor(s, shiftr(s, 12))
    s = ieor(s, shiftl(s, 25))
    s = ieor(s, shiftr(s, 27))
    ! The top 53 bits of s times the xorshift64* multiplier (wrapping multiplication is what the generator needs).
    u = lo + (hi - lo) * real(shiftr(s * 2685821657736338717_int64, 11), real64) / 9007199254740992d0
  end function uniform

  function normal(s) result(z)
    integer(int64), intent(inout) :: s
    real(real64) :: z
    z = sqrt(-2 * log(uniform(s, 1d-12, 1d0))) * cos(2 * PI * uniform(s, 0d0, 1d0))
  end function normal

  ! heat.py initial_conditions for one plate: k = 0.2 + 0.8 * (low Fourier modes scaled to [0, 1]); T0 = three
  ! Gaussian hot spots; zero edges.
  subroutine initial(s, g, t, k)
    integer(int64), intent(inout) :: s
    integer, intent(in) :: g
    real(real64), intent(out) :: t(g, g), k(g, g)
    real(real64) :: f(g, g), a, px, py, cx, cy, width, amp, xi, yj
    integer :: kx, ky, i, j, spot
    f = 0
    do kx = 1, 3
      do ky = 1, 3
        a = normal(s) / (kx * ky)
        px = uniform(s, 0d0, 2 * PI)
        py = uniform(s, 0d0, 2 * PI)
        do j = 1, g
          do i = 1, g
            f(i, j) = f(i, j) + a * sin(PI * kx * (i - 1) / (g - 1d0) + px) * sin(PI * ky * (j - 1) / (g - 1d0) + py)
          end do
        end do
      end do
    end do
    k = 0.2d0 + 0.8d0 * (f - minval(f)) / (maxval(f) - minval(f) + 1d-12)
    t = 0
    do spot = 1, 3
      cx = uniform(s, 0.2d0, 0.8d0)
      cy = uniform(s, 0.2d0, 0.8d0)
      width = uniform(s, 0.05d0, 0.12d0)
      amp = uniform(s, 0.5d0, 1d0)
      do j = 1, g
        do i = 1, g
          xi = (i - 1) / (g - 1d0) - cx
          yj = (j - 1) / (g - 1d0) - cy
          t(i, j) = t(i, j) + amp * exp(-(xi**2 + yj**2) / (2 * width**2))
        end do
      end do
    end do
    t(1, :) = 0; t(g, :) = 0; t(:, 1) = 0; t(:, g) = 0
  end subroutine initial

  ! heat.py simulate for one plate: explicit finite volumes of div(k grad T), harmonic-mean face conductivities
  ! (they keep the flux continuous across a jump in k), zero edges.
  subroutine simulate(g, nsteps, k, t)
    integer, intent(in) :: g, nsteps
    real(real64), intent(in) :: k(g, g)
    real(real64), intent(inout) :: t(g, g)
    real(real64) :: kx(g - 1, g), ky(g, g - 1), fx(g - 1, g), fy(g, g - 1), div(g, g)
    integer :: step
    kx = 2 * k(2:, :) * k(:g - 1, :) / (k(2:, :) + k(:g - 1, :))
    ky = 2 * k(:, 2:) * k(:, :g - 1) / (k(:, 2:) + k(:, :g - 1))
    do step = 1, nsteps
      fx = kx * (t(2:, :) - t(:g - 1, :))
      fy = ky * (t(:, 2:) - t(:, :g - 1))
      div = 0
      div(:g - 1, :) = div(:g - 1, :) + fx
      div(2:, :) = div(2:, :) - fx
      div(:, :g - 1) = div(:, :g - 1) + fy
      div(:, 2:) = div(:, 2:) - fy
      t = t + DT * div
      t(1, :) = 0; t(g, :) = 0; t(:, 1) = 0; t(:, g) = 0
    end do
  end subroutine simulate
end program heat_surrogate
